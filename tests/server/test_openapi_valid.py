"""The OpenAPI document is valid OpenAPI 3.1 (openapi-spec-validator), served and saved alike, and
describes exactly the routes the server registers."""
from __future__ import annotations

import json
import os

from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from collafuse.server.openapi import openapi_document
from collafuse.server.routes import ROUTES

SAVED = os.path.join(os.path.dirname(__file__), "..", "..", "server", "openapi.json")


def test_the_document_and_its_saved_copy_validate_as_openapi_3_1():
    validate(openapi_document())
    with open(SAVED, encoding="utf-8") as f:
        validate(json.load(f))


def test_the_validator_refuses_what_the_document_once_had():
    """A media type object may not carry a description (the document's old /v1/train body did)."""
    doc = openapi_document()
    body = doc["paths"]["/v1/train"]["post"]["requestBody"]
    body["content"]["application/x-npy"]["description"] = "float32 .npy bytes"
    try:
        validate(doc)
    except OpenAPIValidationError as e:
        assert "description" in str(e)
    else:
        raise AssertionError("openapi-spec-validator accepted a description inside a media type object")


def test_every_registered_route_is_documented_and_nothing_else():
    registered = {(r.path, r.method.lower()) for r in ROUTES}
    documented = {(path, method) for path, ops in openapi_document()["paths"].items() for method in ops}
    assert registered == documented


async def test_the_served_document_is_the_valid_one(aiohttp_client, server_config, loaded_run):
    from collafuse.server.app import create_app

    client = await aiohttp_client(create_app(server_config, run=loaded_run))
    r = await client.get("/openapi.json")
    assert r.status == 200
    served = await r.json()
    validate(served)
    assert served == json.loads(json.dumps(openapi_document()))
