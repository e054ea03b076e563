"""A client sends scored spans only to a teacher that serves them (protocol 1.3): an older
teacher is refused before any request, naming the version, instead of answering with a 422."""

from __future__ import annotations

import numpy as np
import pytest

from opd.client.teacher import TeacherClient
from opd.client.teacher.errors import IncompatibleTeacherError
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ModelInfo
from opd.shared.version import at_least


def _info(version: str) -> ModelInfo:
    return ModelInfo(
        name="t", revision="r", backend="hf", vocab_size=100, max_model_len=64, dtype="float32",
        protocol_version=version, tokenizer_fingerprint="f", limits=Limits(),
    )  # fmt: skip


def test_spans_need_a_teacher_of_protocol_1_3():
    ids = [np.arange(10)]
    spans = PackedRequest.from_arrays(ids, None, spans=[[(2, 4), (6, 10)]])
    tail = PackedRequest.from_arrays(ids, [2])
    client = TeacherClient(["http://127.0.0.1:9"])
    try:
        with pytest.raises(IncompatibleTeacherError, match=r"needs protocol 1\.3.*speaks 1\.2"):
            client._score_requests(spans, _info("1.2"))
        assert len(client._score_requests(spans, _info("1.3"))) == 1
        assert len(client._score_requests(tail, _info("1.2"))) == 1  # old requests still go
    finally:
        client.close()
    assert at_least("1.3", (1, 3)) and at_least("2.0", (1, 3)) and not at_least("1.2", (1, 3))
