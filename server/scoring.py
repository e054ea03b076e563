"""The scoring math, in one place for every backend: hidden states in, teacher numbers out.

Given the final hidden states h_N (after the model's final norm) of the N positions whose *next*
token is scored, the LM head weight W_VH and the options, it returns per position:

    z      = (h W^T) / T                       logits at temperature T (float32)
    lse    = logsumexp(z)                      so log q(v) = z_v - lse, never a full softmax copy
    token  = z[target] - lse                   log q of the actual next token
    cands  = z[cand_ids] - lse                 log q at caller-chosen ids (e.g. student's top-k)
    top-k  = topk(z) - lse                     teacher's own top-k ids and log-probs
    H      = lse - sum_v softmax(z)_v z_v      exact full-vocab entropy (nats), with lse

The LM head runs only on scored positions and in chunks of `chunk_tokens` rows, so a [T, V]
float32 logits tensor never exists for a long sequence: peak extra memory is about
chunk_tokens x V x 4 bytes x 3. The matmul runs in the model's dtype (as the model's own forward
does) and is upcast to float32 before any softmax arithmetic.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class HeadSpec:
    """The model's output head: logits = softcap(scale * (h @ weight.T + bias))."""

    weight_VH: torch.Tensor
    bias_V: torch.Tensor | None = None
    logit_scale: float | None = None
    final_softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight_VH.shape[0])


@dataclass
class ScoredRows:
    """float32 numpy arrays, one row per scored position."""

    token_logprobs_N: np.ndarray
    candidate_logprobs_NK: np.ndarray | None
    top_k_ids_Nk: np.ndarray | None
    top_k_logprobs_Nk: np.ndarray | None
    entropy_N: np.ndarray | None


def head_logits(head: HeadSpec, hidden_NH: torch.Tensor) -> torch.Tensor:
    """float32 logits of the LM head for a chunk of hidden states (model dtype matmul)."""
    logits = torch.nn.functional.linear(
        hidden_NH.to(head.weight_VH.dtype), head.weight_VH, head.bias_V
    ).float()
    if head.logit_scale is not None:
        logits = logits * head.logit_scale
    if head.final_softcap is not None:
        logits = torch.tanh(logits / head.final_softcap) * head.final_softcap
    return logits


@torch.inference_mode()
def score_hidden(
    head: HeadSpec,
    hidden_NH: torch.Tensor,
    target_ids_N: torch.Tensor,
    candidate_ids_NK: torch.Tensor | None = None,
    top_k: int = 0,
    entropy: bool = False,
    temperature: float = 1.0,
    chunk_tokens: int = 256,
) -> ScoredRows:
    n = int(hidden_NH.shape[0])
    device = hidden_NH.device
    token_lp = torch.empty(n, dtype=torch.float32, device=device)
    cand_lp = (
        None
        if candidate_ids_NK is None
        else torch.empty(candidate_ids_NK.shape, dtype=torch.float32, device=device)
    )
    top_ids = torch.empty((n, top_k), dtype=torch.int64, device=device) if top_k else None
    top_lp = torch.empty((n, top_k), dtype=torch.float32, device=device) if top_k else None
    ent = torch.empty(n, dtype=torch.float32, device=device) if entropy else None
    targets = target_ids_N.to(device=device, dtype=torch.int64)
    cands = None if candidate_ids_NK is None else candidate_ids_NK.to(device, torch.int64)
    step = max(1, int(chunk_tokens))
    for a in range(0, n, step):
        b = min(n, a + step)
        z = head_logits(head, hidden_NH[a:b])
        if temperature != 1.0:
            z.div_(temperature)
        # log-sum-exp and entropy in one pass over the chunk, relative to the row max (no
        # cancellation): d = z - max, S = sum e^d, lse = max + log S, H = log S - sum(e^d d) / S.
        # Two [chunk, V] temporaries; torch's cascade sums keep float32 error ~1e-6.
        zmax = z.amax(dim=-1, keepdim=True)
        d = z - zmax
        e = d.exp()
        total = e.sum(-1)
        log_total = total.log()
        lse = zmax.squeeze(-1) + log_total
        token_lp[a:b] = z.gather(1, targets[a:b, None]).squeeze(1) - lse
        if cand_lp is not None and cands is not None:
            cand_lp[a:b] = z.gather(1, cands[a:b]) - lse[:, None]
        if top_ids is not None and top_lp is not None:
            vals, idx = torch.topk(z, top_k, dim=-1)
            top_ids[a:b] = idx
            top_lp[a:b] = vals - lse[:, None]
        if ent is not None:
            # e * d is 0 where e underflows to 0; for -inf logits (d = -inf) it would be nan.
            ent[a:b] = log_total - e.mul_(d).nan_to_num_(nan=0.0).sum(-1) / total
        del z, d, e

    def out(x: torch.Tensor | None, dtype: type = np.float32) -> np.ndarray | None:
        return None if x is None else x.cpu().numpy().astype(dtype, copy=False)

    return ScoredRows(
        token_logprobs_N=out(token_lp),
        candidate_logprobs_NK=out(cand_lp),
        top_k_ids_Nk=out(top_ids, np.int32),
        top_k_logprobs_Nk=out(top_lp),
        entropy_N=out(ent),
    )


def score_items(
    head: HeadSpec,
    hidden_per_item: list[torch.Tensor],
    items: list,
    chunk_tokens: int,
) -> list[ScoredRows]:
    """Score a pack given each item's final hidden states [>= n_tokens - 1, H].

    Items that share options (top_k, entropy, temperature, number of candidates) go through the
    LM head together, one chunked pass per group, so one request's options never reach another's
    numbers. Row j of an item's hidden states predicts token j + 1; only rows score_from-1 ..
    n_tokens-2 are used. Shared by every backend, so they differ only in how hidden states are made.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        o = it.options
        k = 0 if it.candidate_ids is None else it.candidate_ids.shape[1]
        groups[(o.top_k, o.entropy, o.temperature, k)].append(i)
    results: list[ScoredRows | None] = [None] * len(items)
    for (top_k, entropy, temperature, k), members in groups.items():
        rows = torch.cat(
            [hidden_per_item[i][items[i].score_from - 1 : items[i].n_tokens - 1] for i in members]
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
            head,
            rows,
            targets,
            cands,
            top_k=top_k,
            entropy=entropy,
            temperature=temperature,
            chunk_tokens=chunk_tokens,
        )
        start = 0
        for i in members:
            end = start + items[i].n_scored
            results[i] = slice_rows(scored, start, end)
            start = end
    return [r for r in results if r is not None]


def slice_rows(rows: ScoredRows, a: int, b: int) -> ScoredRows:
    def s(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else x[a:b]

    return ScoredRows(
        token_logprobs_N=rows.token_logprobs_N[a:b],
        candidate_logprobs_NK=s(rows.candidate_logprobs_NK),
        top_k_ids_Nk=s(rows.top_k_ids_Nk),
        top_k_logprobs_Nk=s(rows.top_k_logprobs_Nk),
        entropy_N=s(rows.entropy_N),
    )
