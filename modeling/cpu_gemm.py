"""Which BLAS runs the teacher's float32 matmuls on single-thread CPU streams: torch's or numpy's.

Why: a pack on a CPU runs as single-thread streams (opd.server.streams), and there the matmuls
are most of the time. torch's x86 wheels do float32 GEMM with MKL; numpy's PyPI wheels ship
OpenBLAS. On our 2-core AMD EPYC VM (Zen 3, AVX2), inside SmolLM2's passes on two streams,
OpenBLAS 0.3.30 ran the MLP's 576 -> 1536 projections 10% faster than torch's MKL and the
other shapes alike, and whole packs scored 5-8% more tokens/s (alternating runs in one
process, docs/benchmarks.md). MKL is tuned first for Intel's CPUs, so `auto` uses numpy's
OpenBLAS on AMD CPUs only. A load-time probe that timed both on the model's weights was tried
instead of the rule: on this machine its 3 s of timing read anywhere from 0.95x to 1.09x, too
noisy to decide a 5% question, so the rule is fixed and OPD_CPU_GEMM overrides it.

How: the decoder's `nn.Linear` layers become `BlasRoutedLinear` (same parameters, no copies)
and the LM head's tiles go through `head_matmul`; both call numpy's BLAS only on a thread whose
torch thread count is 1, on float32 CPU tensors that need no gradient, and torch's otherwise.
numpy's BLAS keeps one process-wide thread count, which is pinned to 1 with threadpoolctl: each
stream thread then runs its GEMMs on itself, side by side, the way torch's per-thread count
lets MKL do. Passes that use several threads (one pack on all cores, generation) keep torch's.

OPD_CPU_GEMM: auto (the rule above, the default), torch, or numpy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

GemmChoice = Literal["auto", "torch", "numpy"]


def numpy_blas_controller():  # -> threadpoolctl.ThreadpoolController | None
    """threadpoolctl's handle on the BLAS that numpy links (OpenBLAS in PyPI wheels), or None
    when it cannot be told apart from other BLAS libraries in the process."""
    from threadpoolctl import ThreadpoolController

    found = ThreadpoolController().select(user_api="blas")
    mine = [
        lib
        for lib in found.lib_controllers
        if "numpy" in lib.filepath or "scipy_openblas" in lib.filepath
    ]
    if not mine:
        return None
    return found.select(filepath=[lib.filepath for lib in mine])


def _routable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        torch.get_num_threads() == 1
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not x.requires_grad
        and not weight.requires_grad
    )


def numpy_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) by numpy's BLAS, into a fresh torch tensor (no copies of x or W)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty((rows.shape[0], weight.shape[0]), dtype=x.dtype)
    np.matmul(rows.numpy(), weight.numpy().T, out=out.numpy())
    if bias is not None:
        out.add_(bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class BlasRoutedLinear(torch.nn.Linear):
    """nn.Linear whose forward uses numpy's BLAS on single-thread float32 CPU calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _routable(x, self.weight):
            return numpy_linear(x, self.weight, self.bias)
        return super().forward(x)


def route_linears(module: torch.nn.Module) -> int:
    """Turn every plain nn.Linear under `module` into a BlasRoutedLinear, in place; the count.
    Subclasses (quantized or LoRA layers) are left alone: their forward is not a plain GEMM."""
    n = 0
    for m in module.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = BlasRoutedLinear
            n += 1
    return n


def head_matmul(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, numpy_blas: bool) -> None:
    """out = h @ weight.T for one LM-head tile, by numpy's BLAS when routed and routable."""
    if numpy_blas and _routable(h, weight):
        np.matmul(h.numpy(), weight.numpy().T, out=out.numpy())
    else:
        torch.mm(h, weight.T, out=out)


def cpu_vendor() -> str:
    """The CPU's vendor string ("AuthenticAMD", "GenuineIntel"...), "" where Linux's
    /proc/cpuinfo does not say (other systems, ARM)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def choose_gemm(
    choice: GemmChoice, *, device: str, dtype: torch.dtype, threads_per_stream: int
) -> str:
    """The BLAS for the streams' matmuls, "torch" or "numpy"; numpy's is pinned to one thread
    per call when it is chosen.

    auto picks numpy's only where it was measured faster: float32 on an AMD CPU whose streams
    have one thread each, with numpy's BLAS being OpenBLAS (MKL is tuned first for Intel's
    CPUs). Everywhere else it keeps torch's; OPD_CPU_GEMM=numpy or torch overrides the rule.
    """
    if choice == "torch" or device != "cpu" or dtype != torch.float32:
        return "torch"
    controller = numpy_blas_controller()
    if choice == "auto":
        openblas = controller is not None and all(
            lib.internal_api == "openblas" for lib in controller.lib_controllers
        )
        if not (openblas and threads_per_stream == 1 and cpu_vendor() == "AuthenticAMD"):
            return "torch"
    if controller is None:
        raise RuntimeError(
            "OPD_CPU_GEMM=numpy: threadpoolctl finds no BLAS library of numpy's to pin to one "
            "thread per call; use OPD_CPU_GEMM=torch or auto"
        )
    controller.limit(limits=1)
    return "numpy"
