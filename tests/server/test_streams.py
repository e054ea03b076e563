"""CPU streams: how packs are cut, how threads are counted, and that split packs score the same.

The backend tests run a real HF model (the tiny random Llama) with two streams against the same
model with one, and the split pack against the independent float64 reference.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from opd.server.backends.base import ScoreItem
from opd.server.streams import balanced_cuts, stream_layout
from opd.shared.schemas import ScoreOptions
from tests.support.reference import ReferenceModel, assert_rows_match

OPTS = ScoreOptions(top_k=4, entropy=True)


@pytest.mark.parametrize(
    ("costs", "parts", "expected"),
    [
        ([1, 1, 1, 1], 2, [(0, 2), (2, 4)]),
        ([10, 1, 1, 1], 2, [(0, 1), (1, 4)]),
        ([1, 1, 10], 2, [(0, 2), (2, 3)]),  # the big one alone: the last run is never empty
        ([5, 5, 5], 3, [(0, 1), (1, 2), (2, 3)]),
        ([5, 5], 4, [(0, 1), (1, 2)]),  # fewer items than parts
        ([7], 2, [(0, 1)]),
        ([], 2, []),
        ([3, 3, 3, 3], 1, [(0, 4)]),
    ],
)
def test_balanced_cuts(costs: list[int], parts: int, expected: list[tuple[int, int]]) -> None:
    assert balanced_cuts(costs, parts) == expected


def test_balanced_cuts_cover_everything_contiguously_and_evenly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        costs = rng.integers(1, 300, rng.integers(1, 20)).tolist()
        parts = int(rng.integers(1, 6))
        cuts = balanced_cuts(costs, parts)
        assert len(cuts) == min(parts, len(costs))
        assert cuts[0][0] == 0 and cuts[-1][1] == len(costs)
        assert all(a < b for a, b in cuts)
        assert all(cuts[j][1] == cuts[j + 1][0] for j in range(len(cuts) - 1))
        # no run exceeds its fair share by more than its own largest item
        fair = sum(costs) / len(cuts)
        for a, b in cuts:
            assert sum(costs[a:b]) <= fair + max(costs[a:b])


def test_stream_layout() -> None:
    assert stream_layout(None, 2, "cpu") == (2, 1)
    assert stream_layout(None, 16, "cpu") == (2, 8)
    assert stream_layout(None, 1, "cpu") == (1, 1)
    assert stream_layout(4, 16, "cpu") == (4, 4)
    assert stream_layout(8, 2, "cpu") == (2, 1)  # never more streams than threads
    assert stream_layout(1, 8, "cpu") == (1, 8)
    assert stream_layout(None, 8, "cuda") == (1, 8)
    assert stream_layout(4, 8, "cuda:0") == (1, 8)


THREADS_CHILD = """
import threading, torch
from opd.server.streams import CPUStreams
torch.set_num_threads(4)
streams = CPUStreams(2, 2)
both = threading.Barrier(2)  # each task waits for the other: one per stream thread
def probe(_):
    both.wait(timeout=30)
    return threading.current_thread().name, torch.get_num_threads()
seen = streams.map(probe, range(2))
later = []
t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
t.start(); t.join()
print(sorted({n for n, _ in seen}), sorted({c for _, c in seen}), torch.get_num_threads(), later)
streams.close()
"""


def test_stream_threads_get_their_share_and_others_keep_the_default() -> None:
    """Own process: torch's thread counts are process state."""
    out = subprocess.run(
        [sys.executable, "-c", THREADS_CHILD], capture_output=True, text=True, check=True
    )
    # stream threads: 2 torch threads each; the creating thread and a later thread: 4
    assert out.stdout.strip().splitlines()[-1] == "['opd-stream_0', 'opd-stream_1'] [2] 4 [4]"


def _items(rng: np.random.Generator) -> list[ScoreItem]:
    """A pack as the batcher hands it over: two rollout groups of one prompt each, and singles."""
    items = []
    for _ in range(2):
        prompt = rng.integers(0, 49152, 20).tolist()
        for n in (9, 6, 4):
            ids = np.array(prompt + rng.integers(0, 49152, n).tolist(), dtype=np.int32)
            items.append(ScoreItem(ids, 20, rng.integers(0, 49152, (n, 5)).astype(np.int32), OPTS))
    for n in (30, 17, 8, 3):
        ids = rng.integers(0, 49152, n).astype(np.int32)
        items.append(ScoreItem(ids, 1, rng.integers(0, 49152, (n - 1, 5)).astype(np.int32), OPTS))
    return items


def test_split_packs_score_like_one_pass_and_like_float64(tiny_model_dir, monkeypatch) -> None:
    from opd.server.backends import hf
    from opd.server.settings import Settings

    def load(streams: int) -> hf.HFBackend:
        # one BLAS on both sides: this test is about the split (test_cpu_gemm.py compares them)
        settings = Settings(
            model=str(tiny_model_dir),
            dtype="float32",
            device="cpu",
            cpu_streams=streams,
            cpu_gemm="torch",
        )
        backend = hf.HFBackend(settings)
        backend.load()
        return backend

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one, two = load(1), load(2)
    finally:
        torch.set_num_threads(previous)
    assert (one.streams, two.streams) == (1, 2)
    seen: list[tuple[str, int]] = []
    serial = two._score_serial

    def spy(items: list[ScoreItem]):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, len(items)))
        return serial(items)

    monkeypatch.setattr(two, "_score_serial", spy)
    items = _items(np.random.default_rng(0))
    got, expected = two.score_pack(items), one.score_pack(items)
    # split in two on the stream threads, each rollout group kept whole
    # units: two groups of 3 (79 tokens each), then singles of 30, 17, 8, 3 tokens
    assert sorted(n for _, n in seen) == [4, 6]
    assert {name.rsplit("_", 1)[0] for name, _ in seen} == {"opd-stream"}
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.token_logprobs_N, b.token_logprobs_N, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.candidate_logprobs_NK, b.candidate_logprobs_NK, atol=1e-5)
        np.testing.assert_allclose(a.entropy_N, b.entropy_N, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(a.top_k_ids_Nk, b.top_k_ids_Nk)
    ref = ReferenceModel(tiny_model_dir)
    for item, rows in zip(items, got, strict=True):
        assert_rows_match(rows, ref, item, 4, 1e-4)
    two.close()
    one.close()


def test_one_rollout_group_runs_on_the_calling_thread(tiny_model_dir, monkeypatch) -> None:
    """A pack that is one shared-context group cannot be split: it keeps all cores."""
    from opd.server.backends import hf
    from opd.server.settings import Settings

    backend = hf.HFBackend(
        Settings(model=str(tiny_model_dir), dtype="float32", device="cpu", cpu_streams=2)
    )
    backend.load()
    threads: list[str] = []
    serial = backend._score_serial
    monkeypatch.setattr(
        backend,
        "_score_serial",
        lambda items: threads.append(threading.current_thread().name) or serial(items),
    )
    backend.score_pack(_items(np.random.default_rng(1))[:3])
    assert threads == [threading.current_thread().name]
    backend.close()


def test_models_whose_rotary_embedding_changes_in_forward_get_one_stream() -> None:
    from opd.server.backends.hf import has_stateful_rope

    assert has_stateful_rope(SimpleNamespace(rope_parameters={"rope_type": "dynamic"}))
    assert has_stateful_rope(SimpleNamespace(rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert has_stateful_rope(SimpleNamespace(rope_parameters={"rope_type": "longrope"}))
    assert not has_stateful_rope(SimpleNamespace(rope_parameters={"rope_type": "default"}))
    assert not has_stateful_rope(SimpleNamespace(rope_parameters={"rope_type": "llama3"}))
    assert not has_stateful_rope(SimpleNamespace())


def test_pack_budget_grows_with_the_streams() -> None:
    from opd.server.settings import Settings

    assert Settings().pack_budget("cpu", 2) == 2048
    assert Settings().pack_budget("cpu") == 1024
    assert Settings().pack_budget("cuda", 2) == 8192
    assert Settings(max_batch_tokens=512).pack_budget("cpu", 2) == 512
