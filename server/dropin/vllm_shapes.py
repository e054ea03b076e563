"""vLLM's serialisations of teacher numbers, built from arrays without pydantic.

- `prompt_logprobs`: vLLM's per-position dicts. A list as long as the prompt; element 0 is None
  (nothing predicts the first token); element p is ``{"<id>": {"logprob", "rank",
  "decoded_token"}}`` with the actual token p first (its vocabulary rank), then the teacher's
  top-k by rank 1..k. When the actual token is among the top-k it appears once, first, with its
  top-k rank, so a position holds k or k + 1 entries. -inf and NaN are written -9999.0.
- `npy_base64`: how vLLM sends arrays inside JSON (vllm.utils.serial_utils.numpy2base64):
  base64 of the `.npy` file bytes, written with allow_pickle=False.
- `completion_logprobs`: the OpenAI `logprobs` object of the generated token (max_tokens 1).

Dicts are built from `.tolist()` values in plain loops: a prompt of 4,096 tokens at k = 16 is
70,000 entries, and pydantic models per entry would cost more than the scoring itself.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np

from opd.server.dropin.prompt_scores import PromptScores

# vLLM's floor for a log-prob in its OpenAI shapes (-inf is not JSON).
LOGPROB_FLOOR = -9999.0


def clamp(logprob: float) -> float:
    """-inf and NaN become -9999.0, as vLLM writes them."""
    return LOGPROB_FLOOR if math.isnan(logprob) or logprob < LOGPROB_FLOOR else logprob


class TokenTexts:
    """`decoded_token` strings: tokenizer.decode([id]) per id, as vLLM's detokenizer does,
    cached (a scoring server sees the same few thousand ids over and over)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._size = len(tokenizer) if tokenizer is not None else 0
        self._cache: list[str | None] = [None] * vocab_size

    def __getitem__(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        text = self._cache[token_id]
        if text is None:
            # Ids past the tokenizer (padded LM-head rows) decode to nothing.
            text = self._tokenizer.decode([token_id]) if token_id < self._size else ""
            self._cache[token_id] = text
        return text

    def decode(self, ids: list[int]) -> str:
        """A completion's text, special tokens skipped (vLLM's default)."""
        if self._tokenizer is None:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def prompt_logprobs(
    token_ids: list[int], scores: PromptScores, texts: TokenTexts
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs` list for one prompt scored from causal row 0."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    lps = scores.token_logprobs.tolist()
    ranks = scores.token_ranks.tolist() if scores.token_ranks is not None else [None] * len(lps)
    top_ids = scores.top_ids.tolist() if scores.top_ids is not None else [[]] * len(lps)
    top_lps = scores.top_logprobs.tolist() if scores.top_logprobs is not None else [[]] * len(lps)
    for j, (lp, rank, ids, vals) in enumerate(zip(lps, ranks, top_ids, top_lps, strict=True)):
        actual = token_ids[j + 1]
        entries: dict[str, dict[str, Any]] = {}
        if actual in ids:  # one entry, first, with the top-k's own numbers (as vLLM's dict)
            r = ids.index(actual)
            lp, rank = vals[r], r + 1
        entries[str(actual)] = {"logprob": clamp(lp), "rank": rank, "decoded_token": texts[actual]}
        for r, (tid, val) in enumerate(zip(ids, vals, strict=True)):
            if tid != actual:
                entries[str(tid)] = {
                    "logprob": clamp(val),
                    "rank": r + 1,
                    "decoded_token": texts[tid],
                }
        out.append(entries)
    return out


def npy_base64(array: np.ndarray) -> str:
    """vLLM's encoding of an array inside JSON: base64 of its .npy bytes, no pickle."""
    with io.BytesIO() as buffer:
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        return base64.b64encode(buffer.getvalue()).decode("ascii")


def completion_logprobs(scores: PromptScores, k: int, texts: TokenTexts) -> dict[str, Any]:
    """OpenAI's `logprobs` of a one-token completion: the token, its log-prob and the top k."""
    assert scores.next_top_ids is not None and scores.next_top_logprobs is not None
    ids = scores.next_top_ids.tolist()
    lps = scores.next_top_logprobs.tolist()
    chosen = ids[0]
    top = {texts[chosen] or "": clamp(lps[0])}
    for tid, lp in zip(ids[:k], lps[:k], strict=True):
        top.setdefault(texts[tid] or "", clamp(lp))
    return {
        "text_offset": [0],
        "token_logprobs": [clamp(lps[0])],
        "tokens": [texts[chosen] or ""],
        "top_logprobs": [top],
    }
