"""HF backend: any AutoModelForCausalLM, run in-process with torch in inference mode.

One forward pass per pack: sequences are right-padded to the pack's longest with an attention
mask (causal models never look right, so padding changes no real position), the *decoder* runs
without the LM head, and only the hidden states of scored positions go through the head, in
chunks, via opd.server.scoring. The batcher keeps padding small by packing similar lengths.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from opd.server.backends.base import BackendInfo, ScoreItem
from opd.server.scoring import HeadSpec, ScoredRows, score_hidden
from opd.server.settings import Settings
from opd.shared.fingerprint import fingerprint_hf_tokenizer

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
    """settings.model, or the embedded SmolLM2 copy (converted once into the cache)."""
    if settings.model:
        return settings.model
    from opd.server.embedded import embedded_model_dir

    return str(embedded_model_dir(Path(settings.cache_dir) if settings.cache_dir else None))


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


def head_spec_for(model: torch.nn.Module) -> HeadSpec:
    """The model's LM head plus the logit transforms some families apply after it."""
    head = model.get_output_embeddings()
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    scaling = getattr(cfg, "logits_scaling", None)  # Granite divides
    if scaling:
        scale = (scale or 1.0) / float(scaling)
    return HeadSpec(
        weight_VH=head.weight,
        bias_V=getattr(head, "bias", None),
        logit_scale=float(scale) if scale not in (None, 1.0) else None,
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
    )


class HFBackend:
    name = "hf"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.model: torch.nn.Module | None = None
        self.decoder: torch.nn.Module | None = None
        self.head: HeadSpec | None = None

    def load(self) -> BackendInfo:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
        self.head = head_spec_for(model)
        cfg = model.config
        context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        if self.settings.max_model_len:
            context = min(context, self.settings.max_model_len)
        name = getattr(cfg, "name_or_path", "") or path
        if name in ("", ".") or os.path.isabs(name):
            name = Path(path).name
        from opd.server.embedded import EMBEDDED_NAME, is_embedded_copy

        if is_embedded_copy(path):
            name = EMBEDDED_NAME
        info = BackendInfo(
            name=str(name),
            revision=model_revision(path, cfg),
            backend=self.name,
            vocab_size=self.head.vocab_size,
            max_model_len=context,
            dtype=str(self.dtype).removeprefix("torch."),
            tokenizer_fingerprint=fingerprint_hf_tokenizer(tokenizer),
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
    def score_pack(self, items: list[ScoreItem]) -> list[ScoredRows]:
        assert self.head is not None
        hidden = self.hidden_states(items)
        # Items that share options are scored together (one chunked LM-head pass per group).
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            o = it.options
            k = 0 if it.candidate_ids is None else it.candidate_ids.shape[1]
            groups[(o.top_k, o.entropy, o.temperature, k)].append(i)
        results: list[ScoredRows | None] = [None] * len(items)
        for (top_k, entropy, temperature, k), members in groups.items():
            rows = torch.cat(
                [hidden[i, items[i].score_from - 1 : items[i].n_tokens - 1] for i in members]
            )
            targets = torch.from_numpy(
                np.concatenate([items[i].token_ids[items[i].score_from :] for i in members])
            )
            cands = None
            if k:
                cands = torch.from_numpy(
                    np.concatenate([items[i].candidate_ids for i in members]).astype(np.int64)
                )
            scored = score_hidden(
                self.head,
                rows,
                targets,
                cands,
                top_k=top_k,
                entropy=entropy,
                temperature=temperature,
                chunk_tokens=self.settings.logits_chunk_tokens,
            )
            start = 0
            for i in members:
                end = start + items[i].n_scored
                results[i] = _slice_rows(scored, start, end)
                start = end
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.model = self.decoder = self.head = None


def _slice_rows(rows: ScoredRows, a: int, b: int) -> ScoredRows:
    def s(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else x[a:b]

    return ScoredRows(
        token_logprobs_N=rows.token_logprobs_N[a:b],
        candidate_logprobs_NK=s(rows.candidate_logprobs_NK),
        top_k_ids_Nk=s(rows.top_k_ids_Nk),
        top_k_logprobs_Nk=s(rows.top_k_logprobs_Nk),
        entropy_N=s(rows.entropy_N),
    )
