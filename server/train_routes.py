"""``POST /v1/train``: a client uploads disclosed x_h batches for server training.

The route is registered with the others in :mod:`.routes`.

Request: body = ``.npy`` float32 ``[B, C, H, W]`` (content type ``application/x-npy``);
headers ``Authorization: Bearer …``, ``X-Collafuse-Batch-Id`` (1-64 of ``[A-Za-z0-9_-]``, unique
per client), ``X-Collafuse-Level`` (must equal the handoff level the token is bound to),
``X-Collafuse-Labels`` (comma-separated class ids, one per row, exactly when the server shares
labels). A token entry with ``min_handoff_level`` refuses x_h below that level (403
``handoff_below_minimum``, nothing stored). Answers: 200 once the batch is durably queued
(fsync'ed: it will be trained exactly once, even across restarts), 409 ``duplicate_batch`` for a
batch id already accepted, 429 when the queue is full (retry later), 400/403/413/415 for anything
malformed — none of which reach the trainer.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from collafuse.spool import BATCH_ID, SpoolFull
from collafuse_edge.errors import ProtocolError
from collafuse_edge.protocol import H_BATCH_ID, H_LABELS, H_LEVEL, NPY_CONTENT_TYPE, decode_tensor

from .auth import charge
from .errors import ApiError
from .middleware import read_body
from .state import require_grant, state_of

log = logging.getLogger("collafuse.server")


def _labels(text: str | None, rows: int, num_classes: int, shared: bool):
    import numpy as np

    if not shared:
        if text is not None:
            raise ApiError(400, "labels_not_shared", "this server does not take labels "
                           "(server_conditioning = none): drop the X-Collafuse-Labels header")
        return None
    if text is None:
        raise ApiError(400, "labels_required", f"this server shares labels: send {H_LABELS} with {rows} class ids")
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ApiError(400, "bad_labels", f"{H_LABELS} must be comma-separated integers") from None
    if len(vals) != rows:
        raise ApiError(400, "bad_labels", f"{H_LABELS} has {len(vals)} labels for {rows} rows")
    if any(v < 0 or v >= num_classes for v in vals):
        raise ApiError(400, "bad_labels", f"labels must lie in [0, {num_classes - 1}]")
    return np.asarray(vals, dtype=np.int64)


async def v1_train(request: web.Request) -> web.Response:
    s = state_of(request)
    grant = require_grant(request)
    trainer = s.trainer
    if trainer is None:
        raise ApiError(404, "training_disabled", "this server does not train; start it with --train")
    T = s.run_config.schedule.num_train_timesteps
    if grant.client_levels >= T:
        raise ApiError(403, "nothing_to_disclose", "this token's client runs every level (c = 1): it has no "
                       "server levels to train")
    if request.content_type != NPY_CONTENT_TYPE:
        raise ApiError(415, "unsupported_media_type", f"send the batch as {NPY_CONTENT_TYPE} (np.save bytes)")
    batch_id = request.headers.get(H_BATCH_ID, "")
    if not BATCH_ID.match(batch_id):
        raise ApiError(400, "bad_batch_id", f"{H_BATCH_ID} must be 1-64 characters of [A-Za-z0-9_-]")
    try:
        level = int(request.headers.get(H_LEVEL, ""))
    except ValueError:
        raise ApiError(400, "bad_level", f"{H_LEVEL} must be the integer handoff level") from None
    if grant.min_handoff_level is not None and level < grant.min_handoff_level:
        raise ApiError(403, "handoff_below_minimum", f"this token may upload x_h only at handoff level "
                       f"{grant.min_handoff_level} or above (min_handoff_level of its token entry); the batch is "
                       f"at level {level}: ask the operator for a larger cut ratio; nothing was stored")
    if level != grant.handoff_level:
        raise ApiError(403, "wrong_level", f"this token is bound to handoff level {grant.handoff_level}; "
                       f"the batch says {level}")
    charge(grant, 0)  # the token's requests_per_minute covers uploads too (429 with Retry-After)
    raw = await read_body(request)  # 413 beyond the body limit, 408 for a stalled body
    try:
        x = decode_tensor(raw, max_bytes=s.config.max_train_body_bytes, dtype="float32", ndim=4,
                          shape_tail=s.sample_shape, require_finite=True)
    except ProtocolError as e:
        raise ApiError(400, "bad_tensor", str(e)) from None
    rows = int(x.shape[0])
    if rows < 1 or rows > s.config.max_train_rows:
        raise ApiError(413 if rows else 400, "bad_rows", f"a batch holds 1-{s.config.max_train_rows} rows, got {rows}")
    labels = _labels(request.headers.get(H_LABELS), rows, s.data.num_classes, s.conditional)
    try:
        new = await asyncio.get_running_loop().run_in_executor(
            None, trainer.spool.put, grant.client, batch_id, level, x, labels)
    except SpoolFull as e:
        raise ApiError(429, "queue_full", str(e), {"Retry-After": "2"}) from None
    except OSError as e:  # disk full / read-only: nothing was acknowledged, the client retries later
        log.error("cannot spool upload %r of %s: %s", batch_id, grant.name, e)
        raise ApiError(503, "storage_unavailable", "the server cannot store uploads right now (its disk "
                       f"refused the write: {e.strerror or type(e).__name__}); retry later",
                       {"Retry-After": "10"}) from None
    if not new:
        raise ApiError(409, "duplicate_batch", f"batch {batch_id!r} was already accepted; it is not trained twice")
    return web.json_response({"accepted": True, "batch_id": batch_id, "rows": rows,
                              "pending_batches": len(trainer.spool), "trainer_step": trainer.step})


__all__ = ["v1_train"]
