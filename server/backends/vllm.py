"""vLLM backend: vLLM's engine computes the final hidden states, opd's scoring math does the rest.

Why not vLLM's own `prompt_logprobs`: it returns only the actual token and the engine's top-k
(capped by max_logprobs) as per-token Python dicts, no entropy, and no log-probs at caller-chosen
candidate ids. Instead the engine runs as a *pooling* model with token-wise ALL pooling and no
activation, which hands back the final (post-norm) hidden state of every position. The server
then applies the model's own LM head, read straight from the checkpoint, with
opd.modeling.scoring in chunks: the same code path as the HF backend, so both serve the same
contract and agree to float tolerance. No vLLM fork, only public API (LLM, PoolerConfig,
TokensPrompt). Cost: hidden states cross from the engine process to ours (L x H floats per
sequence) and the head matmul runs outside vLLM; docs/vllm.md has the measured numbers.

The engine process is spawned by vLLM itself; callers must start servers from a module guarded by
`if __name__ == "__main__":` (opd serve and uvicorn --factory both are).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from opd.modeling.eos import Generated, cut_at_eos, eos_ids
from opd.modeling.head import load_head
from opd.modeling.scoring import HeadSpec, ScoredRows, score_items
from opd.server.allocator import retain_freed_memory
from opd.server.backends.base import ScoreItem
from opd.server.backends.hf import describe_model, resolve_device, resolve_dtype, resolve_model_path
from opd.server.backends.vllm_memory import (
    GiB,
    available_memory_bytes,
    check_plan,
    plan_engines,
)
from opd.server.settings import Settings
from opd.shared.schemas import GenerateOptions, ModelInfo

logger = logging.getLogger(__name__)

# vLLM versions this backend was checked on (docs/vllm.md); others are tried, with a warning.
CHECKED_VLLM_VERSIONS = ("0.32.0",)


class HiddenStateMismatch(RuntimeError):
    """vLLM returned a different number of hidden states than the sequence has tokens."""


class VLLMBackend:
    name = "vllm"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The device of the LM head math; vLLM places the decoder itself.
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.streams = 1  # the engine schedules its own threads
        self.gemm = "torch"
        self.llm: object | None = None
        self.gen_llm: object | None = None  # runner "generate": serves POST /v1/generate
        self.head: HeadSpec | None = None
        self.tokenizer: object | None = None
        self.eos: frozenset[int] = frozenset()
        # Each engine's KV cache in bytes (vllm_memory); None: vLLM sizes it (GPU default).
        self.kv_cache_bytes: int | None = None

    def engine_kwargs(self, path: str) -> dict[str, object]:
        """Arguments for vllm.LLM: a pooling runner returning every position's hidden state."""
        from vllm.config import PoolerConfig

        s = self.settings
        kwargs: dict[str, object] = {
            "model": path,
            "runner": "pooling",
            "convert": "embed",
            "pooler_config": PoolerConfig(
                task="token_embed", tok_pooling_type="ALL", use_activation=False
            ),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tensor_parallel_size": s.tensor_parallel_size,
            "enforce_eager": (
                self.device.type == "cpu" if s.enforce_eager is None else s.enforce_eager
            ),
            "enable_prefix_caching": s.enable_prefix_caching,
            "trust_remote_code": s.trust_remote_code,
            "seed": 0,
        }
        if s.max_model_len:
            kwargs["max_model_len"] = s.max_model_len
        if self.device.type == "cuda":
            share = s.generate_memory_share if s.generate else 0.0
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization * (1 - share)
        if s.vllm_max_num_seqs:
            kwargs["max_num_seqs"] = s.vllm_max_num_seqs
        if self.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_bytes
        return kwargs

    def generate_engine_kwargs(self, path: str) -> dict[str, object]:
        """Arguments for the second engine, a plain generate runner.

        A pooling engine cannot sample, so generation gets its own engine: a second copy of the
        weights and its own KV cache. On GPU it takes `generate_memory_share` of the memory
        budget (the scoring engine the rest); OPD_GENERATE=false leaves it out."""
        kwargs = self.engine_kwargs(path)
        for key in ("convert", "pooler_config"):
            kwargs.pop(key)
        kwargs["runner"] = "generate"
        if self.device.type == "cuda":
            s = self.settings
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization * s.generate_memory_share
        return kwargs

    def load(self) -> ModelInfo:
        import vllm
        from transformers import AutoConfig, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if vllm.__version__ not in CHECKED_VLLM_VERSIONS:
            logger.warning(
                "vLLM %s is not among the versions this backend was checked on (%s)",
                vllm.__version__,
                ", ".join(CHECKED_VLLM_VERSIONS),
            )
        if self.device.type == "cpu" and self.settings.retain_freed_memory:
            retain_freed_memory()  # the head math runs in this process
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        path = resolve_model_path(self.settings)
        trust = self.settings.trust_remote_code
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        self.head = load_head(path, config, self.dtype, self.device, trust)
        self.kv_cache_bytes = self.size_engines(path, config)
        self.llm = vllm.LLM(**self.engine_kwargs(path))
        if self.settings.generate:
            try:
                self.gen_llm = vllm.LLM(**self.generate_engine_kwargs(path))
            except Exception as exc:  # noqa: BLE001 - scoring is the job; generation is extra
                logger.error(
                    "the generate engine failed to start (%r); serving scores only, "
                    "POST /v1/generate answers 501. Lower OPD_GENERATE_MEMORY_SHARE or set "
                    "OPD_GENERATE=false.",
                    exc,
                )
        self.tokenizer = tokenizer
        self.eos = eos_ids(tokenizer, _generation_config(path))
        engine_len = int(self.llm.llm_engine.model_config.max_model_len)  # type: ignore[attr-defined]
        info = describe_model(
            path,
            config,
            tokenizer,
            self.name,
            self.head.vocab_size,
            self.dtype,
            self.settings,
            engine_len,
        )
        logger.info(
            "loaded %s (%s, %s) on vLLM %s; LM head on %s",
            info.name,
            info.revision,
            info.dtype,
            vllm.__version__,
            self.device,
        )
        return info

    def size_engines(self, path: str, config: object) -> int | None:
        """Each engine's KV cache, checked to fit before any engine starts (vllm_memory).

        On CPU it is always explicit: sized from one pack unless OPD_VLLM_KV_CACHE_GIB says
        otherwise, and the engines' total must fit in the memory left. On GPU only an explicit
        OPD_VLLM_KV_CACHE_GIB is passed; vLLM profiles the device for the rest."""
        s = self.settings
        if self.device.type != "cpu":
            return int(s.vllm_kv_cache_gib * GiB) if s.vllm_kv_cache_gib else None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        max_len = s.max_model_len or int(getattr(text, "max_position_embeddings", 0) or 0)
        max_len = max_len or 2048
        plan = plan_engines(
            model_path=path,
            config=config,
            dtype=str(self.dtype).removeprefix("torch."),
            engines=2 if s.generate else 1,
            pack_tokens=s.pack_budget("cpu"),
            max_model_len=max_len,
            kv_cache_gib=s.vllm_kv_cache_gib,
        )
        check_plan(plan, max_len, available_memory_bytes())
        logger.info("vLLM engines: %s", plan.describe())
        return plan.kv_cache

    @property
    def can_generate(self) -> bool:
        return self.gen_llm is not None

    def hidden_states(self, items: list[ScoreItem]) -> list[torch.Tensor]:
        """Final hidden states [n_tokens, H] of each item, computed by the vLLM engine."""
        from vllm.inputs import TokensPrompt

        assert self.llm is not None
        prompts = [TokensPrompt(prompt_token_ids=it.token_ids.tolist()) for it in items]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)  # type: ignore[attr-defined]
        hidden = []
        for it, out in zip(items, outputs, strict=True):
            data = out.outputs.data
            if data.shape[0] != it.n_tokens:
                # All-token pooling must cover every position; a prefix served from cache
                # without its hidden states would silently shift every score.
                raise HiddenStateMismatch(
                    f"vLLM returned {data.shape[0]} hidden states for {it.n_tokens} tokens; "
                    "run without --enable-prefix-caching"
                )
            hidden.append(data.to(self.device))
        return hidden

    @torch.inference_mode()
    def score_pack(self, items: list[ScoreItem]) -> list[ScoredRows]:
        assert self.head is not None
        rows, vocab = self.settings.scoring_tiles(self.device.type)
        return score_items(self.head, self.hidden_states(items), items, rows, vocab)

    def generate(self, prompts: list[list[int]], options: GenerateOptions) -> list[list[Generated]]:
        """Teacher completions from the generate engine (continuous batching over prompts)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.gen_llm is None:
            raise RuntimeError("generation is disabled (OPD_GENERATE=false)")
        greedy = options.temperature == 0
        # vLLM refuses n > 1 when greedy; greedy repeats are identical, so decode once and copy.
        n = 1 if greedy else options.n
        params = [
            SamplingParams(
                n=n,
                temperature=options.temperature,
                top_p=1.0 if greedy else options.top_p,
                max_tokens=options.max_tokens,
                seed=None if options.seed is None else prompt_seed(options.seed + i),
                stop_token_ids=sorted(self.eos),
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.gen_llm.generate(  # type: ignore[attr-defined]
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
        )
        results = []
        for out in outputs:
            done = [_generated(c.token_ids, c.finish_reason, self.eos) for c in out.outputs]
            results.append(done * options.n if greedy else done)
        return results

    def close(self) -> None:
        llms = (self.llm, self.gen_llm)
        self.llm = self.gen_llm = self.head = None
        for llm in llms:
            engine = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if engine is not None:
                engine.shutdown()


def prompt_seed(seed: int) -> int:
    """vLLM seeds completion j of a request with seed + j, so plain seed + i per prompt would
    give prompt i's second completion the seed of prompt i+1's first. A 62-bit seed derived
    from seed + i keeps every prompt's stream its own and still depends on seed + i alone."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 2)


def _generated(token_ids: object, finish_reason: str | None, eos: set[int]) -> Generated:
    """vLLM's completion in opd's form: ids through the EOS, "stop" or "length"."""
    out = cut_at_eos(list(token_ids), eos)  # type: ignore[call-overload]
    if out.finish_reason == "length" and finish_reason == "stop":
        out.finish_reason = "stop"  # a stop the EOS set does not know (e.g. a stop string)
    return out


def _generation_config(path: str) -> object | None:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        return None
