"""One JSON request to a served route, as the drop-in route tests send them."""

from __future__ import annotations

from typing import Any

import httpx


def post_json(url: str, body: Any, status: int = 200) -> Any:
    """POST `body` as JSON to `url` and return the answer's JSON; the test fails, showing the
    answer, unless its status is `status`."""
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()
