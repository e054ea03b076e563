"""numpy's BLAS for the CPU streams' matmuls (opd.modeling.cpu_gemm): when it is used, and that the
numbers stay those of torch's BLAS and of the float64 reference."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from opd.modeling import cpu_gemm
from opd.server.backends.base import ScoreItem
from opd.shared.schemas import ScoreOptions
from tests.support.reference import ReferenceModel, assert_rows_match, chat_batch

OPTS = ScoreOptions(top_k=4, entropy=True)


def test_numpy_linear_equals_torch_linear() -> None:
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    x = torch.randn(3, 7, 32, generator=gen)
    strided = torch.randn(32, 21, generator=gen).T  # not contiguous: numpy reads the strides
    for inp, bias in [(x, None), (x, b), (strided, b), (x[:, :0], b)]:
        got = cpu_gemm.numpy_linear(inp, w, bias)
        assert got.shape == (*inp.shape[:-1], 48) and got.dtype == torch.float32
        torch.testing.assert_close(got, torch.nn.functional.linear(inp, w, bias))


ROUTING_CHILD = """
import torch
from opd.modeling import cpu_gemm
calls = []
real = cpu_gemm.numpy_linear
cpu_gemm.numpy_linear = lambda *a: calls.append(1) or real(*a)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
model.requires_grad_(False)
print(cpu_gemm.route_linears(model))
x = torch.randn(5, 8)
def used(fn):
    calls.clear(); fn(); return len(calls)
torch.set_num_threads(1)
print(used(lambda: model(x)))                                 # single thread, float32: numpy
model.double()
print(used(lambda: model(x.double())))                        # float64: torch
model.float()
print(used(lambda: model(x.requires_grad_())))               # input needs a gradient: torch
x.requires_grad_(False)
torch.set_num_threads(2)
print(used(lambda: model(x)))                                 # several threads: torch
"""


def test_routed_linears_use_numpy_only_for_single_thread_float32_without_grad() -> None:
    """Own process: torch's thread count is process state."""
    out = subprocess.run(
        [sys.executable, "-c", ROUTING_CHILD], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["2", "2", "0", "0", "0"]


def test_route_linears_leaves_subclasses_and_parameters_alone() -> None:
    class LoraLike(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), LoraLike(4, 4), torch.nn.Conv1d(4, 4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight
    assert cpu_gemm.route_linears(model) == 1
    assert type(model[0]) is cpu_gemm.BlasRoutedLinear and type(model[1]) is LoraLike
    assert model[0].weight is weight  # the same parameter, not a copy
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_head_matmul_equals_torch_mm() -> None:
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 16, generator=gen), torch.randn(40, 16, generator=gen)
    a, b = torch.empty(6, 40), torch.empty(6, 40)
    cpu_gemm.head_matmul(h, w, a, numpy_blas=True)
    cpu_gemm.head_matmul(h, w, b, numpy_blas=False)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, h @ w.T)


def _fake_blas(api: str) -> SimpleNamespace:
    pins: list[int] = []
    return SimpleNamespace(
        lib_controllers=[SimpleNamespace(internal_api=api)],
        limit=lambda limits: pins.append(limits),
        pins=pins,
    )


@pytest.mark.parametrize(
    ("choice", "vendor", "api", "device", "dtype", "per_stream", "expected"),
    [
        ("auto", "AuthenticAMD", "openblas", "cpu", torch.float32, 1, "numpy"),
        ("auto", "GenuineIntel", "openblas", "cpu", torch.float32, 1, "torch"),
        ("auto", "", "openblas", "cpu", torch.float32, 1, "torch"),
        ("auto", "AuthenticAMD", "mkl", "cpu", torch.float32, 1, "torch"),
        ("auto", "AuthenticAMD", "openblas", "cpu", torch.float32, 2, "torch"),
        ("auto", "AuthenticAMD", "openblas", "cpu", torch.bfloat16, 1, "torch"),
        ("auto", "AuthenticAMD", "openblas", "cuda", torch.float32, 1, "torch"),
        ("torch", "AuthenticAMD", "openblas", "cpu", torch.float32, 1, "torch"),
        ("numpy", "GenuineIntel", "mkl", "cpu", torch.float32, 4, "numpy"),
        ("numpy", "AuthenticAMD", "openblas", "cuda", torch.float32, 1, "torch"),
    ],
)
def test_choose_gemm_rule(monkeypatch, choice, vendor, api, device, dtype, per_stream, expected):
    blas = _fake_blas(api)
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_gemm, "numpy_blas_controller", lambda: blas)
    got = cpu_gemm.choose_gemm(choice, device=device, dtype=dtype, threads_per_stream=per_stream)
    assert got == expected
    assert blas.pins == ([1] if expected == "numpy" else [])  # pinned exactly when chosen


def test_forcing_numpy_without_a_numpy_blas_to_pin_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(cpu_gemm, "numpy_blas_controller", lambda: None)
    with pytest.raises(RuntimeError, match="OPD_CPU_GEMM=numpy"):
        cpu_gemm.choose_gemm("numpy", device="cpu", dtype=torch.float32, threads_per_stream=1)
    # auto quietly keeps torch's
    assert (
        cpu_gemm.choose_gemm("auto", device="cpu", dtype=torch.float32, threads_per_stream=1)
        == "torch"
    )


PIN_CHILD = """
from threadpoolctl import ThreadpoolController
from opd.modeling import cpu_gemm
blas = cpu_gemm.numpy_blas_controller()
print([lib.internal_api for lib in blas.lib_controllers])
blas.limit(limits=1)
print([lib["num_threads"] for lib in ThreadpoolController().select(user_api="blas").info()])
"""


def test_numpys_openblas_is_found_and_pinned_to_one_thread() -> None:
    """numpy's PyPI wheels (what the install pulls) link OpenBLAS; own process: the pin is
    process-wide."""
    out = subprocess.run(
        [sys.executable, "-c", PIN_CHILD], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines() == ["['openblas']", "[1]"]


class _CountingNumpy:
    """numpy, with its matmul calls counted (stands in for cpu_gemm's `np`)."""

    def __init__(self) -> None:
        self.matmuls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(np, name)

    def matmul(self, *args: object, **kwargs: object) -> object:
        self.matmuls += 1
        return np.matmul(*args, **kwargs)


def _load(model_dir, gemm: str):  # type: ignore[no-untyped-def]
    from opd.server.backends import hf
    from opd.server.settings import Settings

    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # two streams of one thread: where numpy's BLAS runs
    try:
        backend = hf.HFBackend(
            Settings(
                model=str(model_dir), dtype="float32", device="cpu", cpu_streams=2, cpu_gemm=gemm
            )
        )
        backend.load()
    finally:
        torch.set_num_threads(previous)
    return backend


def test_backend_on_numpys_blas_scores_like_torchs_and_like_float64(tiny_model_dir, monkeypatch):
    numpy_backend, torch_backend = _load(tiny_model_dir, "numpy"), _load(tiny_model_dir, "torch")
    assert (numpy_backend.gemm, torch_backend.gemm) == ("numpy", "torch")
    linears = [m for m in numpy_backend.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is cpu_gemm.BlasRoutedLinear for m in linears)
    assert numpy_backend.head.numpy_blas and not torch_backend.head.numpy_blas
    rng = np.random.default_rng(0)
    items = []
    for n in (40, 33, 25, 12):
        ids = rng.integers(0, 49152, n).astype(np.int32)
        items.append(ScoreItem(ids, 2, rng.integers(0, 49152, (n - 2, 5)).astype(np.int32), OPTS))
    counting = _CountingNumpy()
    monkeypatch.setattr(cpu_gemm, "np", counting)
    got = numpy_backend.score_pack(items)
    # every linear layer of both streams' passes, plus the head's tiles, went through numpy
    assert counting.matmuls >= 2 * len(linears) + 2
    monkeypatch.undo()
    expected = torch_backend.score_pack(items)
    ref = ReferenceModel(tiny_model_dir)
    for item, a, b in zip(items, got, expected, strict=True):
        np.testing.assert_allclose(a.token_logprobs_N, b.token_logprobs_N, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.entropy_N, b.entropy_N, atol=1e-5, rtol=0)
        assert_rows_match(a, ref, item, 4, 1e-4)
    numpy_backend.close()
    torch_backend.close()


@pytest.mark.slow
def test_real_smollm2_on_numpys_blas_matches_float64(smollm2_dir) -> None:
    """The real embedded teacher, its chat template, on two streams with numpy's BLAS."""
    from transformers import AutoTokenizer

    backend = _load(smollm2_dir, "numpy")
    assert backend.gemm == "numpy"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rng = np.random.default_rng(0)
    pairs = [("What is 2 + 2?", "2 + 2 equals 4."), ("Name a colour.", "Blue is a colour.")]
    seqs, score_from, cands = chat_batch(tokenizer, pairs, rng, 40)
    items = [
        ScoreItem(
            np.asarray(s, np.int32),
            f,
            np.asarray(c, np.int32),
            ScoreOptions(top_k=16, entropy=True),
        )
        for s, f, c in zip(seqs, score_from, cands, strict=True)
    ]
    ref = ReferenceModel(smollm2_dir)
    for item, rows in zip(items, backend.score_pack(items), strict=True):
        assert_rows_match(rows, ref, item, 16, 1e-4)
    backend.close()
