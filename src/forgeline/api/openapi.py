"""The OpenAPI document: what FastAPI derives, plus what only the runtime knows.

A job's ``input`` is checked against its pipeline's input model, and the
pipelines are plugins found at start. The document names each pipeline's
input schema, so a client (or a fuzzer) that follows the document sends
input the server accepts, and learns what it would refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from forgeline.api.schemas import ErrorEnvelope
from forgeline.pipelines.registry import PipelineRegistry

#: The name of the API key in the document's security schemes.
API_KEY_SCHEME = "apiKey"
#: Where FastAPI puts request and response schemas.
COMPONENTS = "#/components/schemas/{model}"

#: Answers any API route may give, whatever its own purpose.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorEnvelope, "description": "Missing or invalid API key."},
    413: {"model": ErrorEnvelope, "description": "The request body is over the size cap."},
    429: {"model": ErrorEnvelope, "description": "Over a rate limit; see Retry-After."},
    503: {"model": ErrorEnvelope, "description": "The database is unavailable; retry."},
    504: {"model": ErrorEnvelope, "description": "The request took over the time limit."},
}


def install_openapi(app: FastAPI, pipelines: Callable[[], PipelineRegistry]) -> None:
    """Build ``app``'s document on first use, with the input schema of each pipeline."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            describe_job_inputs(document, pipelines())
            require_api_key(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def require_api_key(document: dict[str, Any]) -> None:
    """Declare the bearer API key that every ``/api/`` operation needs (else 401)."""
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})[API_KEY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: 'Authorization: Bearer fl_...'.",
    }
    for path, operations in document.get("paths", {}).items():
        if path.startswith("/api/"):
            for operation in operations.values():
                operation["security"] = [{API_KEY_SCHEME: []}]


def describe_job_inputs(document: dict[str, Any], pipelines: PipelineRegistry) -> None:
    """Make ``JobCreate`` one variant per pipeline, each with its own ``input`` schema."""
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    base = schemas.get("JobCreate")
    if base is None:
        return
    variants: dict[str, str] = {}
    for name, pipeline in sorted(pipelines.all().items()):
        input_schema = pipeline.input_model.model_json_schema(ref_template=COMPONENTS)
        schemas.update(input_schema.pop("$defs", {}))
        input_name = _unique(schemas, pipeline.input_model.__name__)
        schemas[input_name] = input_schema
        needs_input = bool(input_schema.get("required"))
        variant = _variant(base, name, input_name, required_input=needs_input)
        variant_name = _unique(schemas, f"JobCreate_{name}")
        schemas[variant_name] = variant
        variants[name] = COMPONENTS.format(model=variant_name)
    if variants:
        schemas["JobCreate"] = {
            "title": base.get("title", "JobCreate"),
            "description": base.get("description", ""),
            "oneOf": [{"$ref": ref} for ref in variants.values()],
            "discriminator": {"propertyName": "pipeline", "mapping": variants},
        }


def _variant(
    base: Mapping[str, Any], pipeline: str, input_name: str, *, required_input: bool
) -> dict[str, Any]:
    """``JobCreate`` for one pipeline: its name as a constant, its input schema."""
    properties = dict(base.get("properties", {}))
    properties["pipeline"] = {"type": "string", "const": pipeline, "title": "Pipeline"}
    properties["input"] = {"$ref": COMPONENTS.format(model=input_name)}
    required = ["pipeline", *(["input"] if required_input else [])]
    return {
        **base,
        "title": f"JobCreate ({pipeline})",
        "properties": properties,
        "required": required,
    }


def _unique(schemas: Mapping[str, Any], name: str) -> str:
    """``name``, or ``name_2``, ``name_3``... when a component already has it."""
    candidate, number = name, 1
    while candidate in schemas:
        number += 1
        candidate = f"{name}_{number}"
    return candidate
