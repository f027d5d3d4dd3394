"""Signed bundles: a detached Ed25519 signature over ``manifest.json``.

The manifest pins every file of a bundle by sha256, so one signature over the manifest's exact
bytes covers the whole bundle; the signature lives beside it in ``manifest.json.sig`` and the
manifest format does not change. Whoever exports signs with a private key
(``collafuse export --sign-key KEY``); a device that is given trusted public keys
(``collafuse-edge … --trust PUBKEY``, or ``$COLLAFUSE_TRUST``) refuses a bundle that is unsigned,
signed by another key, or changed after signing. With no trust configured, unsigned bundles work
as before.

Ed25519 comes from the ``cryptography`` package (the optional extra ``collafuse-edge[sign]``;
wheels for x86_64 and aarch64). It is imported only when a bundle is signed or checked, so
start-up stays as fast for everyone else.

Files:

* private key: PKCS#8 PEM, unencrypted, written with mode 0600 (keep it off devices);
* public key / trust file: one or more SubjectPublicKeyInfo PEM blocks (``-----BEGIN PUBLIC KEY-----``);
* ``manifest.json.sig``: JSON ``{"format": "collafuse-edge-signature", "format_version": 1,
  "algorithm": "ed25519", "key_id", "manifest_sha256", "signature"}`` (signature: base64 of 64 bytes).

Example::

    write_key_pair("keys/export")                        # keys/export.key, keys/export.pub
    sign_bundle("bundles/client0", "keys/export.key")    # → bundles/client0/manifest.json.sig
    bundle, key_id = load_verified_bundle("bundles/client0", trust=["keys/export.pub"])
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .bundle import MANIFEST_NAME, Bundle, load_bundle
from .errors import BundleError, InputError
from .files import atomic_write_bytes, atomic_write_text

SIGNATURE_NAME = MANIFEST_NAME + ".sig"
SIGNATURE_FORMAT = "collafuse-edge-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
ENV_TRUST = "COLLAFUSE_TRUST"  # trusted public key files, separated like PATH (os.pathsep)
INSTALL_HINT = "pip install 'collafuse-edge[sign]' (Ed25519 from the cryptography package)"
_MAX_SIG_BYTES = 64 * 1024
_MAX_KEY_BYTES = 1 * 2**20
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


def _ed25519() -> Any:
    """The cryptography module for Ed25519, or ImportError saying what to install."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise ImportError(f"signed bundles need the cryptography package ({e}): {INSTALL_HINT}") from None
    return ed25519


def _serialization() -> Any:
    _ed25519()
    from cryptography.hazmat.primitives import serialization

    return serialization


@dataclass(frozen=True)
class TrustedKey:
    key_id: str  # first 16 hex digits of sha256(raw 32-byte public key)
    key: Any  # cryptography's Ed25519PublicKey
    source: str  # the file it came from


def key_id(public_key: Any) -> str:
    ser = _serialization()
    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_small(path: str | os.PathLike, what: str, limit: int) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} is not a file")
    if p.stat().st_size > limit:
        raise InputError(f"{what} {str(p)!r} is larger than {limit} bytes; is it really a key?")
    return p.read_bytes()


# ---------------------------------------------------------------------------------------------
# keys


def write_key_pair(prefix: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 key pair: ``PREFIX.key`` (private, mode 0600) and ``PREFIX.pub`` (public)."""
    ed = _ed25519()
    ser = _serialization()
    priv_path, pub_path = Path(f"{os.fspath(prefix)}.key"), Path(f"{os.fspath(prefix)}.pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise InputError(f"{p} already exists; choose another prefix (a key pair is never overwritten "
                             f"by accident) or pass --overwrite")
    key = ed.Ed25519PrivateKey.generate()
    priv = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(priv_path, priv, mode=0o600)
    atomic_write_bytes(pub_path, pub, mode=0o644)
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike) -> Any:
    """An Ed25519 private key from a PKCS#8 PEM file (what :func:`write_key_pair` writes)."""
    ed = _ed25519()
    ser = _serialization()
    data = _read_small(path, "signing key", _MAX_KEY_BYTES)
    try:
        key = ser.load_pem_private_key(data, password=None)
    except TypeError as e:  # encrypted
        raise InputError(f"signing key {os.fspath(path)!r} is password-protected; give an unencrypted PKCS#8 "
                         f"PEM key (collafuse-edge keygen writes one, mode 0600)") from e
    except ValueError as e:
        raise InputError(f"signing key {os.fspath(path)!r} is not a PEM private key ({str(e)[:120]}); "
                         f"make one with collafuse-edge keygen --out PREFIX") from e
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise InputError(f"signing key {os.fspath(path)!r} is a {type(key).__name__}, not an Ed25519 key; "
                         f"make one with collafuse-edge keygen --out PREFIX")
    return key


def load_trusted_keys(paths: Sequence[str | os.PathLike]) -> list[TrustedKey]:
    """Every Ed25519 public key in the given PEM files (each may hold several)."""
    ed = _ed25519()
    ser = _serialization()
    out: list[TrustedKey] = []
    for path in paths:
        data = _read_small(path, "trusted key file", _MAX_KEY_BYTES)
        blocks = _PEM_PUBLIC.findall(data)
        if not blocks:
            hint = " (that is a private key: give the .pub file)" if b"PRIVATE KEY" in data else ""
            raise InputError(f"trusted key file {os.fspath(path)!r} holds no '-----BEGIN PUBLIC KEY-----' "
                             f"block{hint}; give the public key the exporter signs with")
        for i, block in enumerate(blocks):
            try:
                key = ser.load_pem_public_key(block)
            except ValueError as e:
                raise InputError(f"trusted key file {os.fspath(path)!r}: key {i + 1} is not a valid PEM "
                                 f"public key ({str(e)[:120]})") from e
            if not isinstance(key, ed.Ed25519PublicKey):
                raise InputError(f"trusted key file {os.fspath(path)!r}: key {i + 1} is a "
                                 f"{type(key).__name__}, not Ed25519")
            out.append(TrustedKey(key_id(key), key, os.fspath(path)))
    return out


def trust_from_env() -> list[str]:
    """The trusted key files named by ``$COLLAFUSE_TRUST`` (empty when unset)."""
    raw = os.environ.get(ENV_TRUST, "")
    return [p for p in raw.split(os.pathsep) if p.strip()]


# ---------------------------------------------------------------------------------------------
# signing and checking


def sign_bundle(bundle_dir: str | os.PathLike, private_key: str | os.PathLike | Any) -> Path:
    """Check the bundle (schema and every file's sha256), then write ``manifest.json.sig``
    signing the manifest's exact bytes. ``private_key``: a key file or a loaded key."""
    key = private_key if not isinstance(private_key, (str, os.PathLike)) else load_private_key(private_key)
    where = Path(bundle_dir)
    load_bundle(where)  # never sign a bundle that does not verify
    manifest = (where / MANIFEST_NAME).read_bytes()
    doc = {
        "format": SIGNATURE_FORMAT,
        "format_version": SIGNATURE_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "signature": base64.b64encode(key.sign(manifest)).decode("ascii"),
    }
    out = where / SIGNATURE_NAME
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    return out


def read_signature(bundle_dir: str | os.PathLike) -> dict | None:
    """The parsed ``manifest.json.sig`` (None when the bundle is unsigned); BundleError if malformed."""
    where = Path(bundle_dir)
    p = where / SIGNATURE_NAME
    if not p.is_file():
        return None
    if p.stat().st_size > _MAX_SIG_BYTES:
        raise BundleError(f"bundle {where}: {SIGNATURE_NAME} is larger than {_MAX_SIG_BYTES} bytes; it is not a "
                          f"collafuse signature")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"bundle {where}: {SIGNATURE_NAME} is not valid JSON ({str(e)[:120]}); re-download "
                          f"the bundle or ask its exporter to sign it again") from e
    problems = []
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        problems.append(f"format must be {SIGNATURE_FORMAT!r}")
    elif doc.get("format_version") != SIGNATURE_VERSION:
        problems.append(f"format_version {doc.get('format_version')!r} is not supported (this collafuse-edge "
                        f"reads {SIGNATURE_VERSION})")
    elif doc.get("algorithm") != ALGORITHM:
        problems.append(f"algorithm {doc.get('algorithm')!r} is not supported (only {ALGORITHM})")
    else:
        for field in ("key_id", "manifest_sha256", "signature"):
            if not isinstance(doc.get(field), str):
                problems.append(f"{field} must be a string")
    if problems:
        raise BundleError(f"bundle {where}: {SIGNATURE_NAME} is malformed: {'; '.join(problems)}")
    try:
        doc["_signature_bytes"] = base64.b64decode(doc["signature"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise BundleError(f"bundle {where}: {SIGNATURE_NAME} holds a signature that is not base64") from e
    return doc


def verify_manifest(bundle_dir: str | os.PathLike, manifest: bytes, trusted: Sequence[TrustedKey]) -> str:
    """Check that ``manifest`` (the bytes of the bundle's manifest.json) carries a valid signature
    by one of ``trusted``; returns that key's id. BundleError says exactly what failed."""
    from cryptography.exceptions import InvalidSignature

    where = Path(bundle_dir)
    ids = ", ".join(sorted({t.key_id for t in trusted})) or "none"
    sig = read_signature(where)
    if sig is None:
        raise BundleError(f"bundle {where} is not signed (no {SIGNATURE_NAME}) but this device only accepts "
                          f"bundles signed by a trusted key ({ids}); ask for a bundle exported with "
                          f"collafuse export --sign-key, or run without --trust/${ENV_TRUST} to accept unsigned ones")
    if hashlib.sha256(manifest).hexdigest() != sig["manifest_sha256"]:
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} was changed after it was signed (its sha256 is not the "
                          f"one the signature covers); re-download the bundle or re-export and sign it")
    candidates = [t for t in trusted if t.key_id == sig["key_id"]] or list(trusted)
    for t in candidates:
        try:
            t.key.verify(sig["_signature_bytes"], manifest)
            return t.key_id
        except InvalidSignature:
            continue
    if not any(t.key_id == sig["key_id"] for t in trusted):
        raise BundleError(f"bundle {where} is signed by key {sig['key_id']}, which is not trusted here "
                          f"(trusted: {ids}); add its public key with --trust, or get a bundle signed by a trusted key")
    raise BundleError(f"bundle {where}: the signature in {SIGNATURE_NAME} is not valid for {MANIFEST_NAME} "
                      f"(forged, or the manifest was edited and re-hashed); do not use this bundle")


def load_verified_bundle(
    path: str | os.PathLike, trust: Sequence[str | os.PathLike] | None = None, *, verify_hashes: bool = True,
) -> tuple[Bundle, str | None]:
    """:func:`collafuse_edge.bundle.load_bundle`, plus the signature check when ``trust`` (key
    files; None: ``$COLLAFUSE_TRUST``) names any key. Returns (bundle, signing key id or None)."""
    files = list(trust) if trust is not None else trust_from_env()
    if not files:
        return load_bundle(path, verify_hashes=verify_hashes), None
    trusted = load_trusted_keys(files)
    where = Path(path)
    mpath = where / MANIFEST_NAME
    if not mpath.is_file():
        return load_bundle(path, verify_hashes=verify_hashes), None  # load_bundle names the problem
    manifest = mpath.read_bytes()
    kid = verify_manifest(where, manifest, trusted)
    bundle = load_bundle(where, verify_hashes=verify_hashes)
    if bundle.manifest != json.loads(manifest):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} changed while it was being checked; try again")
    return bundle, kid


def signature_summary(bundle_dir: str | os.PathLike) -> str:
    """One line for ``info``/``doctor``: unsigned, or signed by which key (not checked here)."""
    try:
        sig = read_signature(bundle_dir)
    except BundleError as e:
        return f"malformed signature ({e})"
    return "unsigned" if sig is None else f"signed by key {sig['key_id']} ({sig['algorithm']})"


__all__ = ["ENV_TRUST", "SIGNATURE_NAME", "TrustedKey", "key_id", "load_private_key", "load_trusted_keys",
           "load_verified_bundle", "read_signature", "sign_bundle", "signature_summary", "trust_from_env",
           "verify_manifest", "write_key_pair"]
