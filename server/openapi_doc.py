"""The OpenAPI document: request bodies of raw-body routes, with every `$ref` resolvable.

The scoring routes read their bodies themselves (JSON or msgpack, within a byte limit), so
FastAPI cannot infer their request schemas. Each route names its body model through
`request_body(...)`; `install_openapi(app)` then puts those models (and the models they nest)
under `#/components/schemas`, the only place an OpenAPI 3.1 `$ref` of a client generator or of
schemathesis looks. pydantic's own `$defs` would sit inside the route and not resolve from the
document root.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from opd.shared.version import JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE

_REF = "#/components/schemas/{model}"

# Every body model named by request_body, in registration order (one app per process in
# production; several in tests, which all see the same models).
_BODY_MODELS: dict[str, type[BaseModel]] = {}


def request_body(model: type[BaseModel], msgpack: bool = False) -> dict[str, Any]:
    """`openapi_extra` of a route whose JSON body is `model` (and, with msgpack=True, whose
    body may also be opd's binary msgpack envelope, which no JSON schema describes)."""
    _BODY_MODELS[model.__name__] = model
    content: dict[str, Any] = {
        JSON_MEDIA_TYPE: {"schema": {"$ref": _REF.format(model=model.__name__)}}
    }
    if msgpack:
        content[MSGPACK_MEDIA_TYPE] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def _component_schemas() -> dict[str, Any]:
    """The body models and everything they nest, as component schemas (pydantic's $defs
    lifted to the top, refs rewritten to point there)."""
    schemas: dict[str, Any] = {}
    for name, model in _BODY_MODELS.items():
        schema = model.model_json_schema(ref_template=_REF)
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(def_name, definition)
        schemas[name] = schema
    return schemas


def install_openapi(app: FastAPI) -> None:
    """Replace app.openapi with one that adds the body models' component schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in _component_schemas().items():
                components.setdefault(name, schema)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
