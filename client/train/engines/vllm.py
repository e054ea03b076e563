"""The `vllm` rollout engine: a vLLM engine inside the trainer's process, synced in memory.

Why in-process: the trainer's new weights must reach the engine after every optimizer step
without a save/load round trip through disk. With vLLM's V1 engine core kept in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), the engine's nn.Module is an attribute away and the trainer
hands it its tensors directly (`sync_weights`), the way colocated RL trainers (verl, TRL's
colocate mode) do.

How a sync works: the trainer's state dict (HF parameter names) goes through the vLLM model's
own `load_weights`, which maps names and fuses q/k/v and gate/up the way it does when loading a
checkpoint. On CPU, vLLM repacks every linear layer's weight into a oneDNN / sgl-kernel layout
after loading and frees the plain weight, so a second load has nothing to copy into: the sync
first re-creates each packed layer's plain weight from its own `create_weights`, loads, and then
re-runs the layer's `process_weights_after_loading` so the packed copy is rebuilt from the new
values. On GPU there is no repacking and the load is in place. Prefix caches are dropped after
a sync (cached KV of the old weights must not be reused).

A LoRA student (`lora_rank`): the engine runs vLLM's LoRA support over the base weights it
loaded, and a sync hands it the adapters only (`sync_adapter`: a PEFT folder in memory, loaded
under a new adapter id), megabytes instead of the whole model.

GPU memory: `gpu_memory_utilization` is the engine's share of the device (weights + KV cache);
with `sleep` (GPU only), the engine frees its KV cache and offloads its weights while the
trainer updates (vLLM sleep mode level 1) and wakes before the next sample.

Sampling: every prompt of a call in one `generate` with n samples each, temperature, top-p, no
top-k, max tokens, one seed per prompt, stop at the tokenizer's EOS (kept in the output). The
engine also returns its log-prob of each sampled token ("raw" log-probs, before temperature:
the same quantity as the trainer's student_token_logp), which the trainer compares with its own
to check the engine samples the current weights (metric rollout/engine_logp_abs_diff), and
with `top_ids` its top-K ids at every sampled position (the step's candidate ids).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from opd.client.train.engines.base import Sample

if TYPE_CHECKING:
    from opd.client.train.rollouts import SamplingParams

logger = logging.getLogger(__name__)


class VLLMEngine:
    name = "vllm"
    holds_weights = True

    def __init__(
        self,
        model_dir: str,
        model: torch.nn.Module,
        *,
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.3,
        sleep: bool = True,
        seed: int = 0,
        lora_rank: int = 0,
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
        # vLLM logs every engine step's housekeeping at INFO and a thread-binding note at
        # WARNING on every generate; a training log wants neither (set it to see them).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM

        device = next(model.parameters()).device
        self.on_gpu = device.type == "cuda"
        threads = torch.get_num_threads()
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        extra = {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under torchrun every rank has its own engine (data parallel, one model copy each),
            # inside the process group the trainer already made: vLLM's launcher mode for that.
            extra["distributed_executor_backend"] = "external_launcher"
        if not self.on_gpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prompt is prefilled in chunks: it rewinds the request's CPU generator, which torch
            # does not allow. Whole-prompt prefill avoids the rewind (measured: opd probe's 32
            # prompts x 4 seeded samples crashed with chunked prefill; 242 x 4 pass without).
            extra["enable_chunked_prefill"] = False
            extra["max_num_batched_tokens"] = max(max_model_len, 8192)
        if lora_rank:  # a LoRA student: the base weights stay, its adapters are synced alone
            extra.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_slot(lora_rank))
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=not self.on_gpu,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.on_gpu and sleep,
            generation_config="vllm",  # explicit sampling params only, no checkpoint defaults
            **extra,
        )
        # vLLM's CPU worker lowers torch's intra-op threads for itself; the trainer shares the
        # process and wants them back.
        torch.set_num_threads(threads)
        self.sleeping = False
        self.can_sleep = self.on_gpu and sleep
        self.lora_rank = lora_rank
        self.adapter: Any = None  # the LoRARequest sampled with, after the first sync
        self._adapter_dir = (
            tempfile.mkdtemp(prefix="opd-adapter-", dir=_fast_tmp()) if lora_rank else None
        )

    def _engine_model(self) -> torch.nn.Module:
        executor = self.llm.llm_engine.model_executor
        return executor.driver_worker.worker.model_runner.model

    def sample(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[list[Sample]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        requests = [
            VSamplingParams(
                n=params.options.n,
                temperature=params.options.temperature,
                top_p=params.options.top_p,
                top_k=0,
                max_tokens=params.options.max_tokens,
                seed=seed,
                logprobs=params.top_ids,  # 0: the sampled token's only
                stop_token_ids=list(params.eos_token_ids),
                detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            requests,
            use_tqdm=False,
            lora_request=self.adapter,
        )
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                ids = np.asarray(c.token_ids, dtype=np.int64)
                logp = top = None
                if c.logprobs is not None:
                    logp = np.array(
                        [lp[int(t)].logprob for lp, t in zip(c.logprobs, ids, strict=True)],
                        dtype=np.float32,
                    )
                    if params.top_ids:
                        top = _top_ids(c.logprobs, params.top_ids)
                group.append(Sample(ids, c.finish_reason == "length", logp, top))
            result.append(group)
        return result

    def sync_weights(self, state: Mapping[str, torch.Tensor]) -> float:
        """Copy the student's weights (HF names) into the engine in memory (see module doc)."""
        started = time.perf_counter()
        self.wake()
        target = self._engine_model()
        weights = ((name, t.detach()) for name, t in state.items())
        with torch.no_grad():
            if not self.on_gpu:
                _restore_packed_weights(target)
            target.load_weights(weights)
            if not self.on_gpu:
                _repack(target)
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def sync_adapter(self, peft_model: Any) -> float:
        """A LoRA student: hand the engine its current adapters (a PEFT folder on tmpfs where
        there is one, loaded under a new id, the previous one dropped); the base weights stay
        as loaded. Returns seconds spent."""
        from vllm.lora.request import LoRARequest

        started = time.perf_counter()
        self.wake()
        number = 1 if self.adapter is None else self.adapter.lora_int_id + 1
        assert self._adapter_dir is not None, "sync_adapter: the engine was built without LoRA"
        folder = Path(self._adapter_dir) / f"step-{number}"
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        request = LoRARequest(f"opd-{number}", number, str(folder))
        engine = self.llm.llm_engine
        engine.add_lora(request)  # loaded now, not at the next sample
        if self.adapter is not None:
            engine.remove_lora(self.adapter.lora_int_id)
            shutil.rmtree(self.adapter.lora_path, ignore_errors=True)
        self.adapter = request
        return time.perf_counter() - started

    def sleep(self) -> None:
        if self.can_sleep and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        if getattr(self, "_adapter_dir", None):
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm


# The adapter ranks vLLM can reserve room for (its LoRAConfig.max_lora_rank choices).
_LORA_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _lora_slot(rank: int) -> int:
    """The smallest adapter rank vLLM accepts that holds `rank`."""
    for slot in _LORA_SLOTS:
        if slot >= rank:
            return slot
    raise ValueError(f"lora_rank: the vllm engine holds adapters up to {_LORA_SLOTS[-1]}")


def _fast_tmp() -> str | None:
    """/dev/shm (memory) for the per-step adapter folders where it exists."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _top_ids(logprobs: list, k: int) -> np.ndarray:
    """int64 [T, k]: each position's top-k ids by vLLM's rank (1 = most likely); the sampled
    token's entry, added when it ranks below k, is left out."""
    out = np.empty((len(logprobs), k), dtype=np.int64)
    for t, entries in enumerate(logprobs):
        ranked = sorted((lp.rank, int(tok)) for tok, lp in entries.items() if lp.rank <= k)
        if len(ranked) != k:
            raise RuntimeError(f"vLLM returned {len(ranked)} top ids at position {t}, expected {k}")
        out[t] = [tok for _, tok in ranked]
    return out


def _packed_linear_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    return [
        m
        for m in model.modules()
        if isinstance(m, LinearBase) and isinstance(m.quant_method, UnquantizedLinearMethod)
    ]


def _restore_packed_weights(model: torch.nn.Module) -> None:
    """Give every CPU-repacked linear layer back a plain weight for load_weights to fill."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED

    for layer in _packed_linear_layers(model):
        if layer.weight.numel():
            continue
        method = layer.quant_method
        v2 = type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED and hasattr(
            layer, "weight_loader_v2"
        )
        method.create_weights(
            layer,
            layer.input_size_per_partition,
            layer.output_partition_sizes,
            layer.input_size,
            layer.output_size,
            layer.params_dtype,
            weight_loader=layer.weight_loader_v2 if v2 else layer.weight_loader,
        )


def _repack(model: torch.nn.Module) -> None:
    """Rebuild the CPU-packed copies (linear layers and the LM head) from the loaded weights."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    for layer in _packed_linear_layers(model):
        layer.quant_method.process_weights_after_loading(layer)
    for m in model.modules():
        if isinstance(m, VocabParallelEmbedding) and isinstance(
            m.quant_method, UnquantizedEmbeddingMethod
        ):
            m.quant_method.process_weights_after_loading(m)
