"""The drop-in routes other trainers call first (vLLM's shapes), against real server processes."""

from __future__ import annotations

import httpx
import pytest

from opd.server.dropin.models import ModelList
from tests.support.keys import TEST_API_KEY


@pytest.mark.parametrize("path", ["/health", "/health/"])
def test_health_answers_200_as_vllm_does(tiny_server, path):
    r = httpx.get(tiny_server + path)
    assert r.status_code == 200 and r.content == b""


def test_models_lists_the_served_model_in_vllms_shape(tiny_server):
    body = httpx.get(tiny_server + "/v1/models").json()
    info = httpx.get(tiny_server + "/v1/model").json()
    assert list(body) == ["object", "data"] and body["object"] == "list"
    (card,) = body["data"]
    assert list(card) == [
        "id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission",
    ]  # fmt: skip
    assert card["id"] == info["name"] and card["object"] == "model"
    assert card["max_model_len"] == info["max_model_len"] and isinstance(card["created"], int)
    ModelList.model_validate(body)


def test_models_needs_the_key_and_names_the_served_model(strict_server):
    assert httpx.get(strict_server + "/v1/models").status_code == 401
    assert httpx.get(strict_server + "/health").status_code == 200  # liveness needs no key
    auth = {"Authorization": f"Bearer {TEST_API_KEY}"}
    (card,) = httpx.get(strict_server + "/v1/models", headers=auth).json()["data"]
    assert card["id"] == "strict-teacher"  # OPD_SERVED_MODEL_NAME of the fixture
