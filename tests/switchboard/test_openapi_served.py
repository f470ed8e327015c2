"""The switchboard serves its OpenAPI document, unauthenticated, at /api/v1/openapi.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest_twisted
from openapi_spec_validator import validate

from tests.support import Client, RunningSwitchboard

OPENAPI_JSON = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


@pytest_twisted.ensureDeferred
async def test_the_served_document_is_the_committed_one(switchboard: RunningSwitchboard):
    anonymous = Client(switchboard.url)
    answer = await anonymous.get("/api/v1/openapi.json")
    assert answer.status == 200
    assert answer.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert answer.body == json.loads(OPENAPI_JSON.read_text(encoding="utf-8"))
    validate(answer.body)
    assert "/api/v1/openapi.json" in answer.body["paths"]
    again = await switchboard.admin.get("/api/v1/openapi.json")
    assert again.body == answer.body
    refused = await anonymous.post("/api/v1/openapi.json", {})
    assert refused.status == 405 and refused.headers.getRawHeaders(b"allow") == [b"GET, HEAD"]
