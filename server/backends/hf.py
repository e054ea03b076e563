"""HF backend: any AutoModelForCausalLM, run in-process with torch in inference mode.

One forward pass per pack: sequences are right-padded to the pack's longest with an attention
mask (causal models never look right, so padding changes no real position), the *decoder* runs
without the LM head, and only the hidden states of scored positions go through the head, in
chunks, via opd.modeling.scoring. The batcher keeps padding small by packing similar lengths.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from opd.modeling.cpu_gemm import choose_gemm, route_linears
from opd.modeling.eos import Generated
from opd.modeling.head import head_spec
from opd.modeling.scoring import HeadSpec, ScoredRows, score_items
from opd.modeling.shared_prefix import CacheNotShareable, prefix_groups, shared_prefix_hidden
from opd.server.allocator import retain_freed_memory
from opd.server.backends.base import ScoreItem
from opd.server.generation import HFGenerator
from opd.server.settings import Settings
from opd.server.streams import CPUStreams, balanced_cuts, stream_layout
from opd.shared.fingerprint import fingerprint_hf_tokenizer
from opd.shared.schemas import GenerateOptions, ModelInfo

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def resolve_model_path(settings: Settings) -> str:
    """settings.model (a `.gguf` file: its copy, converted once into the cache), or the embedded
    SmolLM2 copy (likewise)."""
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else None
    if settings.model:
        from opd.modeling.gguf import model_folder

        return model_folder(settings.model, cache_dir)
    from opd.modeling.embedded import embedded_model_dir

    return str(embedded_model_dir(cache_dir))


def model_revision(path: str, config: object) -> str:
    """Hub commit if known, else sha256 of config.json + the weight files' bytes."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    folder = Path(path)
    if not folder.is_dir():
        return "unknown"
    digest = hashlib.sha256()
    for name in ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]:
        file = folder / name
        if not file.is_file():
            continue
        digest.update(name.encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(16 * 1024 * 1024):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:32]


def describe_model(
    path: str,
    cfg: object,
    tokenizer: object,
    backend: str,
    vocab_size: int,
    dtype: torch.dtype,
    settings: Settings,
    engine_len: int | None = None,
) -> ModelInfo:
    """What GET /v1/model publishes about a loaded model, the same for every backend: the
    context is the smallest of the config's, OPD_MAX_MODEL_LEN and the engine's (`engine_len`,
    vLLM), and the limits served are the configured ones clamped to it."""
    from opd.modeling.embedded import EMBEDDED_NAME, is_embedded_copy
    from opd.modeling.gguf import converted_name

    context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
    for cap in (settings.max_model_len, engine_len):
        if cap:
            context = min(context, cap)
    name = getattr(cfg, "name_or_path", "") or path
    if name in ("", ".") or os.path.isabs(name):
        name = Path(path).name
    if is_embedded_copy(path):
        name = EMBEDDED_NAME
    elif converted_name(path):  # a GGUF's copy: its file's name, not the cache folder's
        name = str(converted_name(path))
    return ModelInfo(
        name=str(name),
        revision=model_revision(path, cfg),
        backend=backend,
        vocab_size=vocab_size,
        max_model_len=context,
        dtype=str(dtype).removeprefix("torch."),
        tokenizer_fingerprint=fingerprint_hf_tokenizer(tokenizer),
        limits=settings.effective_limits(context),
    )


def shared_context_groups(
    items: list[ScoreItem], min_prefix: int
) -> tuple[list[list[int]], list[int]]:
    """Indices of items with an identical context (token_ids[:score_from], at least min_prefix
    tokens long, two or more items), and the indices of all other items. 0 turns sharing off.
    score_from is an item's first scored position, with scored spans too: context between or
    after its spans runs in the per-item part of the pass, like the completion does."""
    keys = [
        np.asarray(it.token_ids[: it.score_from], dtype=np.int64).tobytes()
        if min_prefix and it.score_from >= min_prefix
        else None
        for it in items
    ]
    units = prefix_groups(keys)
    return [u for u in units if len(u) > 1], [u[0] for u in units if len(u) == 1]


def has_stateful_rope(config: object) -> bool:
    """Dynamic and long-rope scaling rewrite the rotary buffers inside forward(): two passes at
    once would race on them, so such models get one stream."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return False
    kind = params.get("rope_type") or params.get("type") or ""
    return "dynamic" in kind or kind == "longrope"


def pack_units(items: list[ScoreItem], min_prefix: int) -> list[list[int]]:
    """Item indices in the units that must stay in one sub-pack (a shared-context group, or a
    single item), ordered by their first item so that the batcher's length order is kept."""
    groups, singles = shared_context_groups(items, min_prefix)
    return sorted([*groups, *([i] for i in singles)], key=lambda unit: unit[0])


class HFBackend:
    name = "hf"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.model: torch.nn.Module | None = None
        self.decoder: torch.nn.Module | None = None
        self.head: HeadSpec | None = None
        self.tokenizer: object | None = None
        self.generator: HFGenerator | None = None
        self._share_prefixes = True  # off once a model's cache turns out not to be repeatable
        self._streams: CPUStreams | None = None
        self.streams = 1
        self.gemm = "torch"  # or "numpy": the BLAS of the streams' matmuls (opd.modeling.cpu_gemm)

    def load(self) -> ModelInfo:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self.device.type == "cpu" and self.settings.retain_freed_memory:
            retain_freed_memory()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        path = resolve_model_path(self.settings)
        trust = self.settings.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self.dtype, trust_remote_code=trust
        )
        model.to(self.device).eval()
        model.requires_grad_(False)
        self.model = model
        self.decoder = model.get_decoder()
        self.head = head_spec(model)
        self.tokenizer = tokenizer
        self._choose_gemm(self._start_streams(model.config))
        if self.settings.generate:
            try:
                self.generator = HFGenerator(model, tokenizer)
            except ValueError as exc:  # e.g. no EOS: scoring still works
                logger.error("generation unavailable (%s); POST /v1/generate answers 501", exc)
        info = describe_model(
            path,
            model.config,
            tokenizer,
            self.name,
            self.head.vocab_size,
            self.dtype,
            self.settings,
        )
        logger.info(
            "loaded %s (%s, %s on %s) from %s",
            info.name,
            info.revision,
            info.dtype,
            self.device,
            path,
        )
        return info

    def _start_streams(self, config: object) -> int:
        """Start the CPU streams (opd.server.streams); the torch threads each one gets."""
        streams, per_stream = stream_layout(
            self.settings.cpu_streams, torch.get_num_threads(), self.device.type
        )
        if streams > 1 and has_stateful_rope(config):
            logger.warning("one CPU stream: this model's rotary embedding changes in forward()")
            streams, per_stream = 1, torch.get_num_threads()
        if streams > 1:
            self._streams = CPUStreams(streams, per_stream)
        self.streams = streams
        return per_stream

    def _choose_gemm(self, threads_per_stream: int) -> None:
        """torch's or numpy's BLAS for the streams' matmuls (opd.modeling.cpu_gemm)."""
        assert self.decoder is not None and self.head is not None
        self.gemm = choose_gemm(
            self.settings.cpu_gemm,
            device=self.device.type,
            dtype=self.dtype,
            threads_per_stream=threads_per_stream,
        )
        if self.gemm == "numpy":
            routed = route_linears(self.decoder)
            self.head.numpy_blas = True
            logger.info("CPU GEMM: numpy's BLAS for %d linear layers and the head", routed)

    @torch.inference_mode()
    def hidden_states(self, items: list[ScoreItem]) -> torch.Tensor:
        """Final hidden states [B, L_max, H] of a right-padded pack."""
        assert self.decoder is not None
        longest = max(it.n_tokens for it in items)
        ids = torch.zeros((len(items), longest), dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for b, it in enumerate(items):
            ids[b, : it.n_tokens] = torch.from_numpy(it.token_ids.astype(np.int64))
            mask[b, : it.n_tokens] = 1
        kwargs: dict[str, torch.Tensor] = {"input_ids": ids.to(self.device)}
        if not bool(mask.all()):
            kwargs["attention_mask"] = mask.to(self.device)
        out = self.decoder(**kwargs, use_cache=False)
        return out.last_hidden_state

    @torch.inference_mode()
    def shared_prefix_hidden(self, items: list[ScoreItem]) -> list[torch.Tensor]:
        """Hidden states [n_tokens, H] of items that share their context x_0..x_{s-1}.

        OPD sends n rollouts of one prompt together: the prompt goes through the decoder once,
        its KV cache is repeated n times, and only the completions run after it
        (opd.modeling.shared_prefix). Same positions, same masks, so the same numbers
        (tests/server/test_prefix_sharing.py); the decoder work drops from n (P + C) to P + n C
        tokens. vLLM skips its prefix cache for prompt_logprobs.
        """
        assert self.decoder is not None
        context = items[0].score_from
        head, rest = shared_prefix_hidden(
            self.decoder,
            items[0].token_ids[:context],
            [it.token_ids[context:] for it in items],
            self.device,
        )
        return [torch.cat([head, rest[b, : it.n_tokens - context]]) for b, it in enumerate(items)]

    def score_pack(self, items: list[ScoreItem]) -> list[ScoredRows]:
        """Score a pack: split across the CPU streams when it holds more than one unit."""
        if self._streams is None or len(items) < 2:
            return self._score_serial(items)
        min_prefix = self.settings.min_shared_prefix if self._share_prefixes else 0
        units = pack_units(items, min_prefix)
        costs = [sum(items[i].n_tokens for i in unit) for unit in units]
        cuts = balanced_cuts(costs, self._streams.streams)
        if len(cuts) < 2:  # one shared-context group: one pass on all cores
            return self._score_serial(items)
        parts = [[i for unit in units[a:b] for i in unit] for a, b in cuts]
        scored = self._streams.map(self._score_serial, [[items[i] for i in p] for p in parts])
        out: list[ScoredRows | None] = [None] * len(items)
        for part, rows in zip(parts, scored, strict=True):
            for i, r in zip(part, rows, strict=True):
                out[i] = r
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_serial(self, items: list[ScoreItem]) -> list[ScoredRows]:
        """One pass (or one per shared-context group) over the pack, on the calling thread."""
        assert self.head is not None
        hidden: list[torch.Tensor | None] = [None] * len(items)
        min_prefix = self.settings.min_shared_prefix if self._share_prefixes else 0
        groups, singles = shared_context_groups(items, min_prefix)
        for members in groups:
            try:
                shared = self.shared_prefix_hidden([items[i] for i in members])
            except CacheNotShareable as exc:
                # e.g. hybrid models whose recurrent layers cannot be repeated: plain packs
                logger.warning("shared-context packs off for this model: %s cache", exc)
                self._share_prefixes = False
                singles.extend(members)
                continue
            for i, h in zip(members, shared, strict=True):
                hidden[i] = h
        if singles:
            padded = self.hidden_states([items[i] for i in singles])
            for b, i in enumerate(singles):
                hidden[i] = padded[b]
        rows, vocab = self.settings.scoring_tiles(self.device.type)
        return score_items(self.head, hidden, items, rows, vocab)  # type: ignore[arg-type]

    @property
    def can_generate(self) -> bool:
        return self.generator is not None

    def generate(self, prompts: list[list[int]], options: GenerateOptions) -> list[list[Generated]]:
        """Teacher completions of token-id prompts (blocking; the service runs it off-loop)."""
        assert self.generator is not None
        return self.generator.generate(prompts, options)

    def close(self) -> None:
        if self._streams is not None:
            self._streams.close()
            self._streams = None
        self.model = self.decoder = self.head = self.generator = None
