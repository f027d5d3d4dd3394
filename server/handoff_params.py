"""Validation of the ``POST /v1/handoff`` JSON body into a :class:`HandoffSpec`.

Body (every field but ``n`` optional; unknown fields are refused so typos don't pass silently)::

    {"n": 4,                   # images, 1 … the token's max_n
     "labels": [3, 1, 4, 1],   # one class per image; required iff the server takes labels
     "seed": 123,              # 0 … 2**63-1; drawn by the server and echoed when absent
     "sampler": "ddpm",        # "ddpm" (default, every level T-1 … k) or "ddim"
     "steps": 50,              # ddim only: server levels to evaluate (T-1 and k always included)
     "eta": 0.0,               # ddim only, in [0, 1]
     "handoff_level": 599,     # optional assertion: must equal the token's level (else 403)
     "client": 0}              # optional assertion: must equal the token's client (else 403)
"""
from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from collafuse_edge.schedule import SAMPLERS
from collafuse_edge.validation import is_int

from .auth import Grant
from .engine import HandoffSpec
from .errors import ApiError, bad_request

FIELDS = ("n", "labels", "seed", "sampler", "steps", "eta", "handoff_level", "client")
MAX_SEED = 2**63 - 1


def parse_handoff(body: Any, grant: Grant, *, T: int, num_classes: int | None, conditional: bool) -> HandoffSpec:
    """The spec of a request body, or ApiError 400 (bad value) / 403 (another client's level)."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise bad_request(f"unknown fields {unknown}; allowed: {', '.join(FIELDS)}", "unknown_field")

    if "client" in body and body["client"] != grant.client:
        raise ApiError(403, "forbidden", f"this token is bound to client {grant.client}; "
                                         f"it cannot act for client {body['client']!r}")
    if "handoff_level" in body and body["handoff_level"] != grant.handoff_level:
        raise ApiError(403, "level_not_allowed",
                       f"this token is bound to handoff level {grant.handoff_level} (cut ratio "
                       f"{grant.cut_ratio}); it cannot ask for level {body['handoff_level']!r}")

    if "n" not in body:
        raise bad_request("missing field 'n' (the number of handoff samples)", "invalid_n")
    n = body["n"]
    if not is_int(n):
        raise bad_request(f"n must be an integer, got {json_type(n)}", "invalid_n")
    if not (1 <= n <= grant.max_n):
        raise bad_request(f"n must lie in [1, {grant.max_n}] for this token, got {n}", "invalid_n")

    labels = body.get("labels")
    if conditional:
        if labels is None:
            raise bad_request(f"this server conditions on class labels: send 'labels', {n} integers "
                              f"in [0, {num_classes - 1}]", "invalid_labels")
        if not isinstance(labels, list) or not all(is_int(v) for v in labels):
            raise bad_request("labels must be a list of integers", "invalid_labels")
        if len(labels) != n:
            raise bad_request(f"labels must have one entry per image ({n}), got {len(labels)}", "invalid_labels")
        bad = [v for v in labels if not (0 <= v < num_classes)]
        if bad:
            raise bad_request(f"labels must lie in [0, {num_classes - 1}], got {bad[0]}", "invalid_labels")
        labels = np.asarray(labels, dtype=np.int64)
    elif labels is not None:
        raise bad_request("this server does not take class labels (server_conditioning = none): "
                          "omit 'labels'; labels are disclosure", "invalid_labels")

    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(63)
    elif not is_int(seed) or not (0 <= seed <= MAX_SEED):
        raise bad_request(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}", "invalid_seed")

    sampler = body.get("sampler", "ddpm")
    if sampler not in SAMPLERS:
        raise bad_request(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}", "invalid_sampler")
    steps = body.get("steps")
    eta = body.get("eta", 0.0)
    if sampler == "ddpm":
        if steps is not None or "eta" in body:
            raise bad_request("steps and eta apply to the ddim sampler only; ddpm runs every level",
                              "invalid_sampler")
    else:
        if steps is not None and (not is_int(steps) or not (1 <= steps <= T)):
            raise bad_request(f"steps must be an integer in [1, {T}], got {steps!r}", "invalid_steps")
        # NaN fails the range test; an integer beyond float range is compared, never converted (no overflow)
        if not (is_int(eta) or isinstance(eta, float)) or not (0.0 <= eta <= 1.0):
            raise bad_request(f"eta must be a number in [0, 1], got {eta!r}", "invalid_eta")
    return HandoffSpec(n=n, seed=seed, client_levels=grant.client_levels, labels=labels,
                       sampler=sampler, steps=steps, eta=float(eta))


def json_type(v: Any) -> str:
    return {bool: "a boolean", str: "a string", float: "a number with a fraction", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)
