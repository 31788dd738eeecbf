"""The committed OpenAPI document is the app's current one."""

from __future__ import annotations

import json
from pathlib import Path

from tagpipe_gateway.openapi import render, spec

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_committed_openapi_matches_the_app() -> None:
    assert DOC.exists(), "run: .venv/bin/python -m tagpipe_gateway.openapi docs/openapi.json"
    assert DOC.read_text() == render(), (
        "docs/openapi.json is stale: regenerate with "
        ".venv/bin/python -m tagpipe_gateway.openapi docs/openapi.json"
    )


def test_every_route_documents_problems_and_examples() -> None:
    doc = spec()
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if path.startswith("/v1/"):
                assert "401" in op["responses"], (method, path)
                problem = op["responses"]["401"]["content"]["application/problem+json"]
                assert problem["schema"]["$ref"].endswith("/Problem")
    schemas = doc["components"]["schemas"]
    for name in ("TagResponse", "JobCreated", "JobStatus"):
        assert schemas[name].get("examples"), name
    body = doc["paths"]["/v1/tags"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/*"} <= set(body)
    assert json.dumps(doc)  # serialisable as committed
