"""The OpenAPI 3.1 document of the server, served at ``GET /openapi.json``.

A copy lives in the repository as ``server/openapi.json`` (a test keeps the two equal).
Regenerate it after changing the API::

    python -m collafuse.server.openapi > server/openapi.json
"""
from __future__ import annotations

import json

from collafuse_edge.protocol import (H_CLIENT, H_DTYPE, H_LEVEL, H_MODEL_VERSION, H_QUEUE_MS, H_SAMPLER, H_SEED,
                                     H_SHAPE, H_STEPS, NPY_CONTENT_TYPE)

API_VERSION = 1


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_AUTH_ERRORS = {
    "401": _error("missing, malformed or unknown bearer token (with WWW-Authenticate: Bearer)"),
    "403": _error("the token is disabled, or the body asks for another client or handoff level"),
}


def openapi_document() -> dict:
    tensor_headers = {
        H_SHAPE: ("comma-separated shape of the tensor, e.g. 4,1,16,16", "string"),
        H_DTYPE: ("element type, float32", "string"),
        H_LEVEL: ("the level of the samples: the client's handoff level k-1 (-1: clean images)", "integer"),
        H_MODEL_VERSION: ("'<run>@<step>:<sha256[:12] of the server weights>'", "string"),
        H_SEED: ("the seed used (echoed, or drawn by the server when the request had none)", "string"),
        H_CLIENT: ("the client id the token is bound to", "integer"),
        H_STEPS: ("server levels evaluated", "integer"),
        H_SAMPLER: ("ddpm or ddim", "string"),
        H_QUEUE_MS: ("milliseconds the request waited before its first step", "number"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "collafuse server",
            "version": str(API_VERSION),
            "description": (
                "Split diffusion inference (CollaFuse): the server runs the high-noise levels T-1 … k "
                "for a client whose exported model runs k-1 … 0. Tensors travel as NumPy .npy bytes "
                "(never pickled), metadata in X-Collafuse-* headers, errors as "
                "{\"error\": {\"code\", \"message\"}}. Each bearer token is bound to one client, its "
                "handoff level and its limits. The same seed gives the same samples whether a request "
                "is batched with others or not, and the same as in-process split sampling."
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {
                        "type": "object", "required": ["code", "message"],
                        "properties": {"code": {"type": "string", "examples": ["invalid_n"]},
                                       "message": {"type": "string"}}}},
                },
                "HandoffRequest": {
                    "type": "object", "required": ["n"], "additionalProperties": False,
                    "properties": {
                        "n": {"type": "integer", "minimum": 1, "description": "images; at most the token's max_n"},
                        "labels": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                   "description": "one class per image; required iff labels_required in /v1/info, "
                                                  "refused otherwise"},
                        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                                 "description": "keys the initial and step noise; drawn by the server if absent"},
                        "sampler": {"type": "string", "enum": ["ddpm", "ddim"], "default": "ddpm"},
                        "steps": {"type": "integer", "minimum": 1,
                                  "description": "ddim only: server levels evaluated (T-1 and k always included)"},
                        "eta": {"type": "number", "minimum": 0, "maximum": 1, "default": 0,
                                "description": "ddim only"},
                        "handoff_level": {"type": "integer",
                                          "description": "optional assertion; 403 unless it is the token's level"},
                        "client": {"type": "integer",
                                   "description": "optional assertion; 403 unless it is the token's client"},
                    },
                },
                "TrainAccepted": {
                    "type": "object",
                    "required": ["accepted", "batch_id", "rows", "pending_batches", "trainer_step"],
                    "properties": {
                        "accepted": {"type": "boolean", "const": True},
                        "batch_id": {"type": "string"},
                        "rows": {"type": "integer", "minimum": 1},
                        "pending_batches": {"type": "integer", "minimum": 0,
                                            "description": "uploads queued for training, this one included"},
                        "trainer_step": {"type": "integer", "minimum": 0},
                    },
                },
                "Info": {
                    "type": "object",
                    "required": ["api_version", "model_version", "schedule", "image_shape", "num_classes",
                                 "server_conditioning", "labels_required", "clients", "you", "limits"],
                    "properties": {
                        "api_version": {"type": "integer"},
                        "model_version": {"type": "string"},
                        "step": {"type": "integer"},
                        "schedule": {"type": "object", "description": "collafuse_edge Schedule.to_dict(): "
                                     "num_train_timesteps, beta_schedule, prediction_type, clip_sample, "
                                     "clip_sample_range, betas"},
                        "image_shape": {"type": "array", "items": {"type": "integer"}, "description": "[C, H, W]"},
                        "num_classes": {"type": ["integer", "null"]},
                        "server_conditioning": {"type": "string", "enum": ["label", "none"]},
                        "labels_required": {"type": "boolean"},
                        "clients": {"type": "array", "items": {"type": "object"},
                                    "description": "every client of the run: client, cut_ratio, client_levels, "
                                                   "handoff_level"},
                        "you": {"type": "object", "description": "the caller's grant: name, client, cut_ratio, "
                                "client_levels, handoff_level, max_n, min_handoff_level (uploads below it are "
                                "refused; null: no minimum)"},
                        "samplers": {"type": "array", "items": {"type": "string"}},
                        "limits": {"type": "object"},
                        "serving": {"type": "object"},
                        "tensor_format": {"type": "object"},
                    },
                },
            },
        },
        "paths": {
            "/healthz": {"get": {"summary": "liveness", "responses": {
                "200": {"description": "the process answers", "content": {"application/json": {}}}}}},
            "/readyz": {"get": {"summary": "readiness: model loaded, engine running, not draining", "responses": {
                "200": {"description": "ready", "content": {"application/json": {}}},
                "503": _error("loading or draining (Retry-After)")}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics of the whole server (under --workers N, every worker's numbers merged)",
                "responses": {"200": {"description": "Prometheus text exposition format 0.0.4",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}},
            "/v1/info": {"get": {
                "summary": "schedule, shapes, classes, every client's handoff level, the caller's grant",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "server description",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Info"}}}},
                              **_AUTH_ERRORS}}},
            "/v1/handoff": {"post": {
                "summary": "run the server's levels T-1 … k for n samples; returns the samples at level k-1",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/HandoffRequest"}}}},
                "responses": {
                    "200": {"description": "float32 [n, C, H, W] as .npy bytes (format 1.0, C order, no pickle)",
                            "headers": {h: {"description": d, "schema": {"type": t}}
                                        for h, (d, t) in tensor_headers.items()},
                            "content": {NPY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
                    "400": _error("invalid body: malformed_json, unknown_field, invalid_n, invalid_labels, "
                                  "invalid_seed, invalid_sampler, invalid_steps, invalid_eta"),
                    **_AUTH_ERRORS,
                    "408": _error("request_timeout: the body did not arrive within body_timeout_s"),
                    "413": _error("body larger than the server's max_body_bytes"),
                    "415": _error("Content-Type is not application/json"),
                    "429": _error("rate_limited or quota_exceeded (Retry-After)"),
                    "503": _error("not_ready (loading/draining) or overloaded (Retry-After); safe to retry"),
                }}},
            "/v1/train": {"post": {
                "summary": "upload one batch of disclosed x_h (the token's handoff level) for server training",
                "description": "Acknowledged (200) only once durably queued: trained exactly once, even across "
                               "server restarts. Needs a server started with --train.",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "X-Collafuse-Batch-Id", "in": "header", "required": True,
                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                     "description": "unique per client; a repeated id is answered 409 and not trained twice"},
                    {"name": "X-Collafuse-Level", "in": "header", "required": True, "schema": {"type": "integer"},
                     "description": "must equal the token's handoff level, and be at least the token's "
                                    "min_handoff_level when one is set"},
                    {"name": "X-Collafuse-Labels", "in": "header", "required": False, "schema": {"type": "string"},
                     "description": "comma-separated class ids, one per row; exactly when labels_required"},
                ],
                "requestBody": {"required": True, "description": "float32 [B, C, H, W] .npy bytes, finite",
                                "content": {NPY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {
                    "200": {"description": "durably queued", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/TrainAccepted"}}}},
                    "400": _error("bad_batch_id, bad_level, bad_tensor (shape/dtype/NaN/Inf), bad_labels, "
                                  "labels_required, labels_not_shared"),
                    **_AUTH_ERRORS,
                    "403": _error("forbidden (the token is disabled), wrong_level (not the token's handoff level), "
                                  "nothing_to_disclose (c = 1), handoff_below_minimum (below the token's "
                                  "min_handoff_level); nothing is stored"),
                    "404": _error("training_disabled: the server was started without --train"),
                    "409": _error("duplicate_batch: this batch id was already accepted"),
                    "413": _error("body larger than max_train_body_bytes, or too many rows"),
                    "415": _error("Content-Type is not application/x-npy"),
                    "408": _error("request_timeout: the body did not arrive within body_timeout_s"),
                    "429": _error("queue_full or rate_limited (Retry-After)"),
                    "503": _error("storage_unavailable: the batch could not be stored durably (disk full or "
                                  "read-only; Retry-After); retry with the same batch id"),
                }}},
        },
    }


if __name__ == "__main__":
    print(json.dumps(openapi_document(), indent=2, sort_keys=True))
