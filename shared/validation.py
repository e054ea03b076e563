"""Check a packed request against the limits and the model: one function, used by both sides.

The server calls it before queueing (a failure is a 422 naming the field and the limit); the
client calls it before sending, after splitting, so a request it built is never refused.
"""

from __future__ import annotations

import numpy as np

from opd.shared.errors import ContractError
from opd.shared.limits import Limits
from opd.shared.packed import PackedRequest
from opd.shared.schemas import GenerateOptions


def validate_request(req: PackedRequest, limits: Limits, vocab_size: int) -> None:
    """Raise ContractError on the first broken rule; return None if the request is servable."""
    n = req.n_sequences
    if n < 1:
        raise ContractError("at least one sequence is required", field="sequences", limit=1)
    if n > limits.max_sequences:
        raise ContractError(
            f"{n} sequences exceed max_sequences={limits.max_sequences}",
            field="sequences",
            limit=limits.max_sequences,
        )
    offs = req.seq_offsets_n1
    if offs[0] != 0 or np.any(np.diff(offs) < 0) or offs[-1] != len(req.token_ids_T):
        raise ContractError(
            "seq_offsets must start at 0, never decrease and end at len(token_ids)",
            field="seq_offsets",
        )
    if len(req.score_from_n) != n:
        raise ContractError(
            f"score_from holds {len(req.score_from_n)} entries for {n} sequences",
            field="score_from",
            limit=n,
        )
    lens = req.seq_lens_n
    for i in np.flatnonzero(lens < 2)[:1]:
        raise ContractError(
            f"sequence holds {int(lens[i])} tokens; at least 2 are needed (context + one scored)",
            field=f"sequences[{i}].token_ids",
            limit=2,
        )
    cap = limits.max_tokens_per_sequence
    for i in np.flatnonzero(lens > cap)[:1]:
        raise ContractError(
            f"sequence holds {int(lens[i])} tokens, over max_tokens_per_sequence={cap}",
            field=f"sequences[{i}].token_ids",
            limit=cap,
        )
    total = int(lens.sum())
    if total > limits.max_total_tokens:
        raise ContractError(
            f"request holds {total} tokens, over max_total_tokens={limits.max_total_tokens}",
            field="sequences",
            limit=limits.max_total_tokens,
        )
    bad = np.flatnonzero((req.token_ids_T < 0) | (req.token_ids_T >= vocab_size))
    if bad.size:
        pos = int(bad[0])
        i = int(np.searchsorted(offs, pos, side="right") - 1)
        j = pos - int(offs[i])
        raise ContractError(
            f"token id {int(req.token_ids_T[pos])} is outside the vocabulary [0, {vocab_size})",
            field=f"sequences[{i}].token_ids[{j}]",
            limit=vocab_size,
        )
    sf = req.score_from_n
    for i in np.flatnonzero((sf < 1) | (sf > lens - 1))[:1]:
        raise ContractError(
            f"score_from={int(sf[i])} is out of range: it must lie in [1, len(token_ids) - 1] "
            f"= [1, {int(lens[i]) - 1}]",
            field=f"sequences[{i}].score_from",
            limit=int(lens[i]) - 1,
        )
    _validate_options(req, limits, vocab_size)
    _validate_candidates(req, limits, vocab_size)


def _validate_options(req: PackedRequest, limits: Limits, vocab_size: int) -> None:
    o = req.options
    top_cap = min(limits.max_top_k, vocab_size)
    if o.top_k < 0 or o.top_k > top_cap:
        cap = f"max_top_k={top_cap}" if top_cap == limits.max_top_k else "the vocabulary size"
        raise ContractError(
            f"top_k={o.top_k} is outside [0, {top_cap}] ({cap})", field="top_k", limit=top_cap
        )
    if not (limits.min_temperature <= o.temperature <= limits.max_temperature):
        raise ContractError(
            f"temperature={o.temperature} is outside "
            f"[{limits.min_temperature}, {limits.max_temperature}]",
            field="temperature",
            limit=limits.min_temperature
            if o.temperature < limits.min_temperature
            else limits.max_temperature,
        )


def _validate_candidates(req: PackedRequest, limits: Limits, vocab_size: int) -> None:
    cands = req.candidate_ids_NK
    if cands is None:
        return
    n_scored_total = int(req.n_scored_n.sum())
    if cands.ndim != 2 or cands.shape[0] != n_scored_total:
        raise ContractError(
            f"candidate_ids must be a [n_scored, k] matrix with n_scored={n_scored_total} rows "
            f"in total; got shape {list(cands.shape)}",
            field="candidate_ids",
            limit=n_scored_total,
        )
    k = cands.shape[1]
    if k < 1 or k > limits.max_candidates:
        raise ContractError(
            f"{k} candidate ids per position; allowed 1..max_candidates={limits.max_candidates}",
            field="candidate_ids",
            limit=limits.max_candidates,
        )
    bad = np.argwhere((cands < 0) | (cands >= vocab_size))
    if bad.size:
        row, col = (int(x) for x in bad[0])
        scored = req.scored_offsets_n1
        i = int(np.searchsorted(scored, row, side="right") - 1)
        raise ContractError(
            f"candidate id {int(cands[row, col])} is outside the vocabulary [0, {vocab_size})",
            field=f"sequences[{i}].candidate_ids[{row - int(scored[i])}][{col}]",
            limit=vocab_size,
        )


def validate_generate(
    options: GenerateOptions,
    prompts: list[list[int]],
    limits: Limits,
    vocab_size: int,
    field: str,
) -> None:
    """Check a generate request (prompts already as token ids) against the limits.

    `field` names the request's prompt field ("prompts" or "prompt_token_ids") for messages."""
    n = len(prompts)
    if n > limits.max_sequences:
        raise ContractError(
            f"{n} prompts exceed max_sequences={limits.max_sequences}",
            field=field,
            limit=limits.max_sequences,
        )
    _at_most("n", options.n, "max_generate_n", limits.max_generate_n)
    _at_most("max_tokens", options.max_tokens, "max_generate_tokens", limits.max_generate_tokens)
    _at_most("temperature", options.temperature, "max_temperature", limits.max_temperature)
    if 0 < options.temperature < limits.min_temperature:
        # logits / 5e-324 overflow to inf and sampling fails; below min_temperature sampling is
        # greedy in all but name, so the caller is told to ask for 0 (greedy) instead.
        raise ContractError(
            f"temperature={options.temperature} is below min_temperature="
            f"{limits.min_temperature}; use 0 for greedy decoding",
            field="temperature",
            limit=limits.min_temperature,
        )
    cap = limits.max_tokens_per_sequence
    for i, ids in enumerate(prompts):
        if not ids:
            raise ContractError("prompt is empty", field=f"{field}[{i}]", limit=1)
        if len(ids) + options.max_tokens > cap:
            raise ContractError(
                f"prompt of {len(ids)} tokens + max_tokens={options.max_tokens} exceeds "
                f"max_tokens_per_sequence={cap} (the context)",
                field=f"{field}[{i}]",
                limit=cap,
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ContractError(
                f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                field=f"{field}[{i}]",
                limit=vocab_size,
            )


def _at_most(field: str, value: float, cap: str, limit: float) -> None:
    """Refuse `field`=value over the limit named `cap`."""
    if value > limit:
        raise ContractError(f"{field}={value} exceeds {cap}={limit}", field=field, limit=limit)
