"""The feature net's files: ``<stem>.safetensors`` (weights) + ``<stem>.json`` (architecture,
training report and the weights' sha256), written atomically; nothing is unpickled."""
from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import torch

from collafuse_edge.files import atomic_write_bytes, atomic_write_text, sha256_file

from ..errors import CheckpointError
from .features_model import RECIPE_VERSION, FeatureNetConfig, TrainingReport

if TYPE_CHECKING:
    from .features_model import FeatureNet

FORMAT = "collafuse-feature-net"
FORMAT_VERSION = 1


def _pair_paths(path: str) -> tuple[str, str]:
    path = os.fspath(path)
    for ext in (".safetensors", ".json"):
        if path.endswith(ext):
            path = path[: -len(ext)]
    return path + ".safetensors", path + ".json"


def _sha256(path: str) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e}") from e


def save_feature_net(net: "FeatureNet", path: str) -> tuple[str, str]:
    """Write ``net`` as ``<stem>.safetensors`` and ``<stem>.json`` atomically; return both paths.

    ``path`` is the stem or either file name. The JSON is written last and carries the
    weights' sha256, so a reader never pairs a new JSON with old weights unnoticed.
    """
    from safetensors.torch import save as safetensors_bytes

    weights, meta = _pair_paths(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    data = safetensors_bytes(tensors)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(weights, data)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe_version": RECIPE_VERSION,
        "weights_file": os.path.basename(weights),
        "weights_sha256": digest,
        "config": {"image_shape": list(net.config.image_shape), "num_classes": net.config.num_classes,
                   "widths": list(net.config.widths), "feature_dim": net.config.feature_dim},
        "report": net.report.to_dict() if net.report is not None else None,
    }
    atomic_write_text(meta, json.dumps(doc, indent=2) + "\n")
    return weights, meta



def load_feature_net(path: str, device: str | torch.device = "cpu", *, cls: type | None = None) -> "FeatureNet":
    """Read a pair written by :func:`save_feature_net` as a ``cls`` (default :class:`FeatureNet`). Raises :class:`CheckpointError` naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .features_model import FeatureNet

    cls = FeatureNet if cls is None else cls

    weights, meta = _pair_paths(path)
    for p in (weights, meta):
        if not os.path.isfile(p):
            raise CheckpointError(f"feature net file {p!r} does not exist; a feature net is a "
                                  "<stem>.safetensors + <stem>.json pair written by FeatureNet.save")
    try:
        with open(meta, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"feature net config {meta!r} is not readable JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{meta!r} is not a {FORMAT} config (format="
                              f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta!r} has format_version {doc.get('format_version')!r}; "
                              f"this collafuse reads version {FORMAT_VERSION}")
    try:
        c = doc["config"]
        config = FeatureNetConfig(tuple(c["image_shape"]), c["num_classes"], tuple(c["widths"]),
                                  c["feature_dim"])
        report = TrainingReport(**doc["report"]) if doc.get("report") is not None else None
        expected_sha = str(doc["weights_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"feature net config {meta!r} is malformed: {e}") from e
    actual_sha = _sha256(weights)
    if actual_sha != expected_sha:
        raise CheckpointError(
            f"feature net weights {weights!r} do not match their config {meta!r} (sha256 "
            f"{actual_sha[:12]}… ≠ {expected_sha[:12]}…): the file is corrupted or from another "
            "net; delete both files to retrain")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"feature net weights {weights!r} are not a valid safetensors file: {e}") from e
    net = cls(config, report)
    ref = net.state_dict()
    problems = [f"missing {k}" for k in ref if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in ref]
    problems += [f"{k}: shape {tuple(state[k].shape)} ≠ {tuple(v.shape)}, dtype {state[k].dtype} vs {v.dtype}"
                 for k, v in ref.items()
                 if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)]
    if problems:
        raise CheckpointError(f"feature net weights {weights!r} do not fit the config in {meta!r}: "
                              + "; ".join(problems[:8]) + (" …" if len(problems) > 8 else ""))
    net.load_state_dict(state)
    return net.to(device).eval()


