"""The student's per-position math with bounded memory: rollout statistics and the loss.

A full-vocabulary float32 tensor over a micro-batch's completion positions is N x V x 4 bytes:
4,096 positions of a 49,152-token vocabulary are 805 MB, and log_softmax, its gradient and the
autograd copies multiply that several times. Both places where the student looks at its whole
vocabulary therefore work on a bounded number of positions at a time:

- rollout statistics (`position_stats`, no gradient): the decoder runs once per micro-batch, the
  completion rows' final hidden states go through the LM head in tiles by the teacher service's
  own scoring math (opd.modeling.scoring.score_hidden: online log-sum-exp, top-k merged across
  tiles, exact entropy), so the student's numbers and the teacher's are computed the same way;
- the loss (`StudentModule`, op "loss"): the decoder runs once per micro-batch, then the LM
  head, log_softmax and the objective run on `chunk_tokens` completion rows at a time under
  activation checkpointing (torch.utils.checkpoint, non-reentrant). Forward keeps only each
  chunk's [c] losses; backward recomputes one chunk's logits at a time. Every objective is a
  function of its own row (the one cross-row quantity, the sampled objective's discounted
  advantages, is computed over the whole batch first:
  opd.client.train.objectives.prepare_batch), so the chunked loss and its gradients equal the
  unchunked ones up to float summation order.

`StudentModule` is an nn.Module whose forward is every pass over the student (loss, statistics,
generation), so DistributedDataParallel and FSDP2 wrap it like any model: their hooks see each
pass as one forward.

The one-forward step (docs/training.md): a training step need not run the statistics pass at
all. The engine hands out the candidate ids, and the loss pass, which computes every row's
full-vocabulary log-probs anyway, records the student's numbers there (`RowNumbers`: log p of
the sampled token and at the candidates, the trainer's own top-K, entropy) and uses them as the
rollout-time values p_old, which on-policy they are: the weights have not moved since sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opd.client.train import objectives as obj
from opd.client.train.positions import TokenBatch, pad_right
from opd.modeling.head import head_spec, logit_transforms
from opd.modeling.scoring import ScoredRows, score_hidden
from opd.modeling.shared_prefix import CacheNotShareable, prefix_groups, shared_prefix_hidden

# Completion rows per LM-head chunk: 512 x 49,152 float32 logits are 100 MB.
DEFAULT_CHUNK_TOKENS = 512


def final_hidden(model: torch.nn.Module, ids_BL: torch.Tensor, mask_BL: torch.Tensor):
    """Hidden states after the decoder's final norm [B, L, H]: what the LM head multiplies."""
    out = model.get_decoder()(input_ids=ids_BL, attention_mask=mask_BL, use_cache=False)
    return out.last_hidden_state


def shared_final_hidden(
    model: torch.nn.Module, ids_BL: torch.Tensor, mask_BL: torch.Tensor, contexts: Sequence[int]
) -> torch.Tensor:
    """final_hidden, with the rows that share their first `contexts[b]` ids (the n rollouts
    of one prompt: context = the first trained position) running those ids once
    (opd.modeling.shared_prefix). Raises CacheNotShareable for a model whose cache cannot be
    repeated."""
    host = ids_BL.cpu().numpy()
    lengths = mask_BL.sum(1).cpu().numpy()
    groups = prefix_groups([host[b, :c].tobytes() if c else None for b, c in enumerate(contexts)])
    if all(len(g) == 1 for g in groups):
        return final_hidden(model, ids_BL, mask_BL)
    decoder, width = model.get_decoder(), ids_BL.shape[1]
    parts: list[torch.Tensor] = []
    order: list[int] = []
    singles = [g[0] for g in groups if len(g) == 1]
    if singles:
        index = torch.tensor(singles, device=ids_BL.device)
        parts.append(final_hidden(model, ids_BL[index], mask_BL[index]))
        order += singles
    for g in (g for g in groups if len(g) > 1):
        context = contexts[g[0]]
        tails = [host[b, context : lengths[b]] for b in g]
        head, rest = shared_prefix_hidden(decoder, host[g[0], :context], tails, ids_BL.device)
        rows = torch.cat([head.expand(len(g), *head.shape), rest], dim=1)
        parts.append(F.pad(rows, (0, 0, 0, width - rows.shape[1])))
        order += g
    inverse = torch.from_numpy(np.argsort(np.asarray(order))).to(ids_BL.device)
    return torch.cat(parts).index_select(0, inverse)


def completion_rows(
    positions: Sequence[np.ndarray], width: int, device: torch.device
) -> torch.Tensor:
    """Flat indices into a [B * L] view of the rows that predict each trained token: row t - 1
    of sequence b for every trained position t of it (its completion, or its episode's
    assistant turns), in order."""
    index = [b * width + np.asarray(pos, dtype=np.int64) - 1 for b, pos in enumerate(positions)]
    flat = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(flat).to(device)


def as_positions(scored: int | np.ndarray, length: int) -> np.ndarray:
    """Trained positions of a sequence of `length` tokens: an int p is the tail p .. length-1
    (a single completion after a p-token prompt); an array is taken as the positions."""
    if isinstance(scored, (int, np.integer)):
        return np.arange(int(scored), length, dtype=np.int64)
    return np.asarray(scored, dtype=np.int64)


@torch.no_grad()
def position_stats(
    student: StudentModule,
    sequences: Sequence[np.ndarray],
    scored: Sequence[int | np.ndarray],
    top_k: int,
    *,
    batch_tokens: int = 8192,
) -> list[dict[str, np.ndarray]]:
    """The student's rollout-time numbers per trained position of each sequence: log p of
    the sampled token, top-K ids and log-probs, full-vocabulary entropy (positions.py names).
    scored[i]: sequence i's prompt length, or its trained positions (as_positions).

    Sequences run through the decoder in right-padded micro-batches of at most `batch_tokens`
    padded tokens (one sequence at least), and through the LM head `chunk_tokens` rows at a time.
    """
    model = student.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stats: list[dict[str, np.ndarray]] = []
    try:
        for group in _token_groups([len(s) for s in sequences], batch_tokens):
            seqs = [sequences[i] for i in group]
            positions = [as_positions(scored[i], len(sequences[i])) for i in group]
            ids_BL, mask_BL = pad_right(seqs)
            targets = torch.from_numpy(
                np.concatenate([s[pos] for s, pos in zip(seqs, positions, strict=True)])
            )
            rows = student(
                "stats",
                torch.from_numpy(ids_BL).to(device),
                torch.from_numpy(mask_BL).to(device),
                positions,
                targets,
                top_k,
            )
            start = 0
            for pos in positions:
                end = start + len(pos)
                stats.append(
                    {
                        "student_token_logp_T": rows.token_logprobs_N[start:end],
                        "student_topk_ids_TK": rows.top_k_ids_Nk[start:end].astype(np.int64),
                        "student_topk_logp_TK": rows.top_k_logprobs_Nk[start:end],
                        "student_entropy_T": rows.entropy_N[start:end],
                    }
                )
                start = end
    finally:
        model.train(was_training)
    return stats


def _token_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's padded size (count x longest) fits budget."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


@dataclass
class RowNumbers:
    """The student's numbers at every row of a loss pass (no gradient; positions.py names):
    log p of the sampled token, log p at the batch's candidate ids, the trainer's own top-K
    ids (what the candidates are compared with) and the full-vocabulary entropy. What the
    one-forward step records in place of a statistics pass."""

    token_logp_N: torch.Tensor
    cand_logp_NK: torch.Tensor
    topk_ids_NK: torch.Tensor
    entropy_N: torch.Tensor

    @classmethod
    def of(cls, logp_RV: torch.Tensor, rows: TokenBatch) -> RowNumbers:
        logp_RV = logp_RV.detach()
        return cls(
            logp_RV.gather(1, rows.target_N[:, None])[:, 0],
            logp_RV.gather(1, rows.student_topk_ids_NK),
            logp_RV.topk(rows.student_topk_ids_NK.shape[1], dim=-1).indices,
            -(logp_RV.exp() * logp_RV).sum(-1),
        )

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.token_logp_N, self.cand_logp_NK, self.topk_ids_NK, self.entropy_N)


def on_policy(rows: TokenBatch, numbers: RowNumbers) -> TokenBatch:
    """Rows whose rollout-time student values were not recorded (the one-forward step) get the
    current ones: the loss pass runs the weights that sampled, so p_old = p (rho = 1)."""
    if rows.student_token_logp_N is not None and rows.student_topk_logp_NK is not None:
        return rows
    return replace(
        rows,
        student_token_logp_N=numbers.token_logp_N,
        student_topk_logp_NK=numbers.cand_logp_NK,
    )


def head_log_softmax(
    h_RH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Full-vocabulary float32 log-probs of R rows (with gradient): the model's own head."""
    z = F.linear(h_RH, weight_VH, bias_V)
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16/fp16 up; float64 stays
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return torch.log_softmax(z, dim=-1)


class StudentModule(torch.nn.Module):
    """The student as one module whose forward is every pass the trainer makes over it.

        student("loss", batch)            per-token loss [N] of the objective, head in chunks
        student("loss", batch, True)      (loss [N], RowNumbers): the one-forward step
        student("hidden", ids, mask, pos) the decoder's part of the loss pass, run early
                                          (while the teacher scores) and handed to "loss"
        student("stats", ids, mask, ...)  rollout-time statistics (no gradient; position_stats)
        student("generate", ids, ...)     transformers' generate (the hf rollout engine)

    Why one forward: DistributedDataParallel and FSDP2 act through the hooks of the module they
    wrap. Under FSDP2 this module is the root that holds the embeddings, final norm and LM head
    (each decoder layer is its own unit), and those are gathered only while the root's forward
    runs, so a pass that went around it (the decoder or the head called directly) would meet
    sharded parameters. chunk_tokens 0 runs the head on all rows at once (the reference the
    chunked path is tested against, and the old memory profile). share_prompts: the n rollouts
    of a prompt run it through the decoder once, in the loss and the statistics passes alike.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: obj.ObjectiveConfig | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        share_prompts: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.chunk_tokens = chunk_tokens
        self.share_prompts = share_prompts
        self.scale, self.softcap = logit_transforms(model.config)

    def _hidden(
        self, ids_BL: torch.Tensor, mask_BL: torch.Tensor, positions: Sequence[np.ndarray]
    ) -> torch.Tensor:
        """The decoder's final hidden states; with share_prompts, the rollouts of one prompt
        run it once (shared_final_hidden), until a model's cache turns out not repeatable."""
        if self.share_prompts:
            contexts = [int(p[0]) if len(p) else 0 for p in positions]  # 0: shares nothing
            try:
                return shared_final_hidden(self.model, ids_BL, mask_BL, contexts)
            except CacheNotShareable:
                self.share_prompts = False  # e.g. a hybrid model's recurrent state
        return final_hidden(self.model, ids_BL, mask_BL)

    def forward(self, op: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if op == "loss":
            return self._loss(*args, **kwargs)
        if op == "hidden":
            return self._hidden(*args)
        if op == "stats":
            return self._stats(*args)
        if op == "generate":
            return self.model.generate(*args, **kwargs)
        raise ValueError(f"op must be loss, stats or generate, got {op!r}")

    def _stats(
        self,
        ids_BL: torch.Tensor,
        mask_BL: torch.Tensor,
        positions: list[np.ndarray],
        targets_N: torch.Tensor,
        top_k: int,
    ) -> ScoredRows:
        hidden = self._hidden(ids_BL, mask_BL, positions)
        rows = completion_rows(positions, hidden.shape[1], hidden.device)
        h_NH = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        chunk = self.chunk_tokens if self.chunk_tokens > 0 else max(1, int(h_NH.shape[0]))
        return score_hidden(
            head_spec(self.model), h_NH, targets_N, top_k=top_k, entropy=True, chunk_tokens=chunk
        )

    def _loss(
        self, batch: TokenBatch, record: bool = False, hidden: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, RowNumbers]:
        """The objective's per-row loss; with `record` also the student's numbers at each row
        (RowNumbers), which fill in rollout-time values the batch lacks (on_policy). `hidden`:
        the decoder's output for batch.ids_BL, computed earlier by op "hidden" (with its
        graph), so only the head, the objective and the backward are left."""
        if self.objective is None:
            raise ValueError("objective: the loss needs an objective")
        unrecorded = batch.student_token_logp_N is None
        if unrecorded and not record:
            raise ValueError("loss: a batch without rollout-time student values needs record")
        if not unrecorded:
            batch = obj.prepare_batch(self.objective, batch)
        if hidden is None:
            hidden = self._hidden(batch.ids_BL, batch.mask_BL, batch.positions)
        rows = completion_rows(batch.positions, hidden.shape[1], hidden.device)
        h_NH = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        head = self.model.get_output_embeddings()
        out = chunked_head_loss(
            h_NH,
            head.weight,
            getattr(head, "bias", None),
            batch,
            self.objective,
            self.chunk_tokens,
            self.scale,
            self.softcap,
            record=record,
        )
        loss_N, numbers = out if record else (out, None)
        if batch.target_positions is not None:
            loss_N = torch.cat([loss_N, self._target_nll(hidden, batch)])
        return (loss_N, numbers) if record else loss_N

    def _target_nll(self, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        # off-policy target rows (re-anchoring): -log p of the teacher's ids, same forward
        targets = completion_rows(batch.target_positions, hidden.shape[1], hidden.device)
        h_MH = hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets)
        return chunked_nll(
            h_MH,
            head.weight,
            getattr(head, "bias", None),
            batch.target_ids_M,
            self.chunk_tokens,
            self.scale,
            self.softcap,
        )


def chunked_head_loss(
    h_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    batch: TokenBatch,
    objective: obj.ObjectiveConfig,
    chunk_tokens: int,
    scale: float | None = None,
    softcap: float | None = None,
    *,
    record: bool = False,
) -> Any:
    """Per-token loss [N] from the completion rows' final hidden states: LM head, log_softmax
    and objective on `chunk_tokens` rows at a time (0: all at once), each chunk under
    non-reentrant activation checkpointing. `batch` must be prepared (prepare_batch).

    record: returns (loss [N], RowNumbers), the student's numbers read from the same log-probs;
    rows without rollout-time values get them from there (on_policy). The sampled objective
    is computed after the head then, from every row's log p of its token: a discounted return
    needs the rewards of the rows after it, which later chunks hold."""
    if record and objective.name == "sampled":
        # every row's log p of its token (with gradient) and the numbers, then the objective
        def chunk_logp(
            h_RH: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: TokenBatch
        ):
            logp_RV = head_log_softmax(h_RH, w, b, scale, softcap)
            numbers = RowNumbers.of(logp_RV, rows)
            return logp_RV.gather(1, rows.target_N[:, None])[:, 0], *numbers.as_tuple()

        out = _in_chunks(chunk_logp, h_NH, weight_VH, bias_V, batch, batch.rows, chunk_tokens)
        numbers = RowNumbers(*out[1:])
        batch = obj.prepare_batch(objective, on_policy(batch, numbers))
        loss_N = obj.sampled_token_loss(
            out[0],
            batch.student_token_logp_N,
            batch.teacher_token_logp_N,
            advantages_N=batch.advantages_N,
            clip_eps=objective.clip_eps,
        )
        return loss_N, numbers

    def chunk_loss(h_RH: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: TokenBatch):
        logp_RV = head_log_softmax(h_RH, w, b, scale, softcap)
        if not record:
            return obj.per_token_loss(objective, logp_RV, rows)
        numbers = RowNumbers.of(logp_RV, rows)
        return obj.per_token_loss(objective, logp_RV, on_policy(rows, numbers)), *numbers.as_tuple()

    out = _in_chunks(chunk_loss, h_NH, weight_VH, bias_V, batch, batch.rows, chunk_tokens)
    return (out[0], RowNumbers(*out[1:])) if record else out


def chunked_nll(
    h_MH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    target_M: torch.Tensor,
    chunk_tokens: int,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """-log p(target) per row [M], the head run `chunk_tokens` rows at a time under activation
    checkpointing like the objective's (off-policy targets: teacher-written turns)."""

    def chunk_nll(h_RH: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor):
        logp_RV = head_log_softmax(h_RH, w, b, scale, softcap)
        return -logp_RV.gather(1, t[:, None])[:, 0]

    return _in_chunks(
        chunk_nll, h_MH, weight_VH, bias_V, target_M, lambda a, b: target_M[a:b], chunk_tokens
    )


def _in_chunks(
    fn: Callable[..., torch.Tensor],
    h_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    whole: Any,
    rows: Callable[[int, int], Any],
    chunk_tokens: int,
) -> torch.Tensor:
    """fn(h, weight, bias, rows(a, b)) over `chunk_tokens` rows at a time (0: all at once, on
    `whole`), each chunk under non-reentrant activation checkpointing, so only one chunk's
    [rows, vocab] log-probs are alive at a time, in the forward and in the backward."""
    n = h_NH.shape[0]
    step = n if chunk_tokens <= 0 else chunk_tokens
    if step >= n:
        return fn(h_NH, weight_VH, bias_V, whole)
    parts = [
        checkpoint(
            fn,
            h_NH[a : a + step],
            weight_VH,
            bias_V,
            rows(a, min(n, a + step)),
            use_reentrant=False,
        )
        for a in range(0, n, step)
    ]
    if isinstance(parts[0], tuple):  # several outputs per chunk: each concatenated
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))
    return torch.cat(parts)
