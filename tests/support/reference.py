"""Independent float64 reference: the model's own full logits, log_softmax in float64.

Nothing here shares code with opd.modeling.scoring: it runs the whole HF model (LM head
included) on one sequence at a time, unbatched, and derives every number from the [T, V]
logits directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


@dataclass
class Reference:
    logprobs_TV: np.ndarray  # float64 log-probs of the scored positions, [n_scored, V]

    def token(self, targets: np.ndarray) -> np.ndarray:
        return self.logprobs_TV[np.arange(len(targets)), targets]

    def at(self, ids_NK: np.ndarray) -> np.ndarray:
        return np.take_along_axis(self.logprobs_TV, ids_NK.astype(np.int64), axis=1)

    def entropy(self) -> np.ndarray:
        p = np.exp(self.logprobs_TV)
        return -(p * np.where(p > 0, self.logprobs_TV, 0.0)).sum(-1)

    def top_values(self, k: int) -> np.ndarray:
        return -np.sort(-self.logprobs_TV, axis=1)[:, :k]

    def rank_bounds(self, targets: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
        """The vocabulary rank of each target (1 = top, ties against it) lies in [lo, hi]:
        ids within `tol` of the target's log-prob may fall either way in float32."""
        lp = self.token(targets)[:, None]
        lo = 1 + (self.logprobs_TV > lp + tol).sum(-1)
        hi = (self.logprobs_TV >= lp - tol).sum(-1)
        return lo, hi


class ReferenceModel:
    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.no_grad()
    def reference(
        self,
        token_ids: np.ndarray,
        score_from: int | None,
        temperature: float = 1.0,
        positions: np.ndarray | None = None,
    ):
        """The whole sequence through the model once; the log-probs of the rows that predict
        tokens score_from .. L-1, or exactly the tokens at `positions` (scored spans)."""
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))[None]
        logits = self.model(ids).logits[0].double()  # [T, V]
        if positions is None:
            scored = logits[score_from - 1 : len(token_ids) - 1]
        else:
            scored = logits[torch.as_tensor(np.asarray(positions, dtype=np.int64) - 1)]
        return Reference(torch.log_softmax(scored / temperature, dim=-1).numpy())


def span_positions(spans) -> np.ndarray:
    """The scored positions of [start, end) spans, in order (written out, not opd's helper)."""
    return np.array([p for a, b in spans for p in range(a, b)], dtype=np.int64)


def assert_matches(
    result, ref: Reference, token_ids, score_from, candidates, top_k, atol, positions=None
):
    """Every returned number equals the float64 reference within `atol`; the rows are about
    tokens score_from .. L-1, or the tokens at `positions` when given."""
    if positions is None:
        targets = np.asarray(token_ids[score_from:], dtype=np.int64)
    else:
        targets = np.asarray(token_ids, dtype=np.int64)[np.asarray(positions, dtype=np.int64)]
    assert len(result.token_logprobs) == len(targets)
    np.testing.assert_allclose(result.token_logprobs, ref.token(targets), atol=atol, rtol=0)
    if candidates is not None:
        np.testing.assert_allclose(result.candidate_logprobs, ref.at(candidates), atol=atol, rtol=0)
    if top_k:
        # Robust to exact ties: the values must be the true top-k values in order, and each
        # returned id must carry the log-prob the reference gives that id.
        np.testing.assert_allclose(result.top_k_logprobs, ref.top_values(top_k), atol=atol, rtol=0)
        np.testing.assert_allclose(
            ref.at(result.top_k_ids), result.top_k_logprobs, atol=atol, rtol=0
        )
        assert all(len(set(row)) == top_k for row in result.top_k_ids.tolist())
    if result.entropy is not None:
        np.testing.assert_allclose(result.entropy, ref.entropy(), atol=atol, rtol=0)
    ranks = getattr(result, "token_ranks", None)
    if ranks is not None:
        lo, hi = ref.rank_bounds(targets, atol)
        assert np.all((lo <= ranks) & (ranks <= hi)), (ranks, lo, hi)


def chat_batch(tokenizer, pairs, rng: np.random.Generator, random_len: int, k: int = 16):
    """Sequences of chat-template prompt + answer, scored from the answer on, with k random
    candidate ids per scored position; plus one random sequence of random_len scored from 1."""
    seqs, score_from, cands = [], [], []
    for prompt, answer in pairs:
        ctx = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        ans_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        seqs.append(np.array(ctx_ids + ans_ids))
        score_from.append(len(ctx_ids))
        cands.append(rng.integers(0, len(tokenizer), (len(ans_ids), k)))
    seqs.append(rng.integers(0, len(tokenizer), random_len))
    score_from.append(1)
    cands.append(rng.integers(0, len(tokenizer), (random_len - 1, k)))
    return seqs, score_from, cands


def assert_rows_match(rows, ref_model: ReferenceModel, item, top_k: int, atol: float) -> None:
    """A backend's ScoredRows for one ScoreItem equal the float64 reference within `atol`."""
    result = SimpleNamespace(
        token_logprobs=rows.token_logprobs_N,
        candidate_logprobs=rows.candidate_logprobs_NK,
        top_k_ids=rows.top_k_ids_Nk,
        top_k_logprobs=rows.top_k_logprobs_Nk,
        entropy=rows.entropy_N,
    )
    ids, s = item.token_ids, item.score_from
    assert_matches(result, ref_model.reference(ids, s), ids, s, item.candidate_ids, top_k, atol)
