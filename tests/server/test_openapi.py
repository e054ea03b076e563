"""The served OpenAPI document is valid and self-contained: an OpenAPI validator accepts it, every
`$ref` points inside the document and resolves, and every POST route documents its body, so
client generators and schemathesis (tests/server/test_fuzz.py) can use it as it is."""

from __future__ import annotations

from typing import Any

import httpx
from openapi_spec_validator import validate

POST_ROUTES = {
    "/v1/score",
    "/v1/generate",
    "/v1/completions",
    "/inference/v1/generate",
    "/generate",
    "/get_sequence_logprobs/",
}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve at {part!r}"
        node = node[part]
    return node


def test_the_openapi_document_is_valid_and_every_ref_resolves(tiny_server):
    doc = httpx.get(tiny_server + "/openapi.json").json()
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    refs = _refs(doc)
    assert refs, "the body models are referenced from components"
    for ref in set(refs):
        assert isinstance(_resolve(doc, ref), dict)
    assert "$defs" not in str(refs)  # nested pydantic $defs were lifted into components


def test_every_post_route_documents_its_request_body(tiny_server):
    doc = httpx.get(tiny_server + "/openapi.json").json()
    for route in POST_ROUTES:
        body = doc["paths"][route]["post"]["requestBody"]
        schema = body["content"]["application/json"]["schema"]
        target = _resolve(doc, schema["$ref"]) if "$ref" in schema else schema
        assert target.get("properties"), route
