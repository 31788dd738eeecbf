"""The OpenAPI document, and writing it: `python -m tagpipe_gateway.openapi docs/openapi.json`.

The committed `docs/openapi.json` is checked against the live app by a unit
test, so the published contract cannot drift from the code; another test
generates a client from it (openapi-python-client) and drives a real stack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from tagpipe_gateway.schemas import JobItem, JobResultLine, JobUpload, TagRequest, TagUpload

REF = "#/components/schemas/"

# Models the routes use only through hand-written request bodies and NDJSON lines,
# which FastAPI cannot see: without these, generated clients name inline schemas
# after the operation (`TagImagesV1TagsPostJsonTagRequest`).
_NAMED: tuple[tuple[type[BaseModel], JsonSchemaMode], ...] = (
    (TagRequest, "validation"),
    (TagUpload, "validation"),
    (JobItem, "validation"),
    (JobUpload, "validation"),
    (JobResultLine, "serialization"),
)


def ref(model: type[BaseModel]) -> dict[str, str]:
    """A `$ref` to a model's component (one of `_NAMED`, or a route's own model)."""
    return {"$ref": REF + model.__name__}


def operation_id(route: APIRoute) -> str:
    """The route function's name: short and stable (`get_job`, not `get_job_v1_jobs__id__get`)."""
    return route.name


def _without_null_defaults(schema: Any) -> Any:
    # FastAPI drops pydantic's `"default": null`; nothing else may differ.
    if isinstance(schema, dict):
        return {
            k: _without_null_defaults(v)
            for k, v in schema.items()
            if not (k == "default" and v is None)
        }
    if isinstance(schema, list):
        return [_without_null_defaults(v) for v in schema]
    return schema


def _add_components(doc: dict[str, Any]) -> None:
    _, defs = models_json_schema(list(_NAMED), ref_template=REF + "{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        mine = _without_null_defaults(schema)
        # A name FastAPI registered already must mean the same schema.
        if schemas.setdefault(name, mine) != mine:
            raise ValueError(f"two different schemas are named {name}")


def install(app: FastAPI) -> None:
    """Have `app.openapi()` also register the models of `_NAMED` as components."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_components(base())  # base() caches the document it returns
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def spec() -> dict[str, Any]:
    # Imported here: the app imports this module to install the document.
    from tagpipe_gateway.app import create_app
    from tagpipe_gateway.settings import GatewaySettings

    # Settings do not shape the document; defaults keep it independent of the environment.
    app = create_app(GatewaySettings.model_construct())
    return app.openapi()


def render() -> str:
    return json.dumps(spec(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
