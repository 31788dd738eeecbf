"""The committed OpenAPI document is the app's current one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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
    assert {
        "application/json",
        "multipart/form-data",
        "application/octet-stream",
        "image/*",
    } <= set(body)
    assert json.dumps(doc)  # serialisable as committed


def _operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {op["operationId"]: op for item in doc["paths"].values() for op in item.values()}


def test_operation_ids_are_short_and_stable() -> None:
    ops = _operations(spec())
    assert {
        "tag_images",
        "get_results",
        "submit_job",
        "submit_job_json",
        "get_job",
        "get_job_results",
        "get_job_results_page",
        "cancel_job",
    } <= set(ops)
    assert all(re.fullmatch(r"[a-z_]{3,24}", op_id) for op_id in ops), sorted(ops)


def test_every_body_and_answer_is_a_named_component() -> None:
    doc = spec()
    named = set(doc["components"]["schemas"])
    for op_id, op in _operations(doc).items():
        bodies = op.get("requestBody", {}).get("content", {})
        answers = [r.get("content", {}) for r in op["responses"].values()]
        for ctype, media in [*bodies.items(), *(i for a in answers for i in a.items())]:
            if ctype.startswith("text/plain") and "schema" not in media:
                continue  # /metrics: Prometheus text
            schema = media["schema"]
            if schema.get("type") == "array":  # submit_job_json: a list of named items
                schema = schema["items"]["anyOf"][1]
            if "$ref" not in schema and schema.get("type") == "string":
                continue  # raw bytes and NDJSON text: no fields to name
            assert schema["$ref"].removeprefix("#/components/schemas/") in named, (op_id, ctype)


def test_results_lines_have_a_schema_with_the_cursor() -> None:
    doc = spec()
    results = _operations(doc)["get_job_results"]["responses"]["200"]["content"]
    line = results["application/x-ndjson"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert line == "JobResultLine"
    schema = doc["components"]["schemas"][line]
    assert {"cursor", "item_id", "status", "tags"} <= set(schema["required"]) | set(
        schema["properties"]
    ) and "cursor" in schema["required"]


def test_tags_declares_the_query_parameters_it_reads() -> None:
    op = _operations(spec())["tag_images"]
    assert {p["name"] for p in op["parameters"] if p["in"] == "query"} == {
        "top_k",
        "min_score",
        "timeout_ms",
    }
