"""The per-position arrays: one schema from rollouts to the loss and the diagnostics.

Every number the student and the teacher give about a completion position has one name, used
at every stage; only the shape suffix says where it sits. The suffixes, documented here once:

    T     completion positions of one rollout (its tokens after the prompt)
    N     completion positions of a batch, flattened over its n rollouts in order; rollout i
          owns rows seq_offsets[i]:seq_offsets[i+1] (int64 [n + 1], seq_offsets[0] = 0)
    K     the student's top-K candidate ids per position (sent to the teacher as candidates)
    k     the teacher's top-k ids per position
    V     vocabulary size
    B, L  a right-padded micro-batch: B sequences, L its longest prompt + completion length

The fields (log-probs are full-vocabulary, never renormalised; entropies in nats):

    student_token_logp    log p_old(y_t) of the sampled token, at rollout time       [T] / [N]
    student_topk_ids      the student's top-K ids at rollout time                   [T,K] / [N,K]
    student_topk_logp     log p_old at those ids                                    [T,K] / [N,K]
    student_entropy       H(p_old)                                                   [T] / [N]
    teacher_token_logp    log q(y_t), from the teacher service                       [T] / [N]
    teacher_cand_logp     log q at the student's top-K ids                          [T,K] / [N,K]
    teacher_topk_ids      the teacher's own top-k ids                               [T,k] / [N,k]
    teacher_topk_logp     log q at those ids                                        [T,k] / [N,k]
    teacher_entropy       H(q)                                                       [T] / [N]

A `Rollout` (opd.client.train.rollouts) holds them per rollout (`student_topk_ids_TK`, ...);
`PositionStats` holds a batch flattened once (`student_topk_ids_NK`, ...) and is what the
diagnostics read; `TokenBatch` is a micro-batch's slice of it as tensors plus the padded token
ids the student's forward pass needs. Teacher fields the request did not ask for are None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from opd.client.train.rollouts import Rollout

# The field names, in the order of the table above.
STUDENT_FIELDS = ("student_token_logp", "student_topk_ids", "student_topk_logp", "student_entropy")
TEACHER_FIELDS = (
    "teacher_token_logp",
    "teacher_cand_logp",
    "teacher_topk_ids",
    "teacher_topk_logp",
    "teacher_entropy",
)
# Shape suffix per field, per rollout (T...) and flattened (N...).
ROLLOUT_SUFFIX = {
    "student_token_logp": "_T",
    "student_topk_ids": "_TK",
    "student_topk_logp": "_TK",
    "student_entropy": "_T",
    "teacher_token_logp": "_T",
    "teacher_cand_logp": "_TK",
    "teacher_topk_ids": "_Tk",
    "teacher_topk_logp": "_Tk",
    "teacher_entropy": "_T",
}
FLAT_SUFFIX = {name: "_N" + s[2:] for name, s in ROLLOUT_SUFFIX.items()}
_ID_FIELDS = ("student_topk_ids_NK", "teacher_topk_ids_Nk", "seq_offsets")
_EPISODE_FIELDS = ("depth_N", "turn_N", "chunk_N")


def pad_right(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 ids [B, L] and attention mask [B, L] (1 on real tokens).

    The one padding helper of the student side: the rollout statistics pass and the loss pass
    both run the student on right-padded batches (causal attention: padding after a sequence
    never changes its logits)."""
    longest = max((len(s) for s in sequences), default=0)
    ids_BL = np.zeros((len(sequences), longest), dtype=np.int64)
    mask_BL = np.zeros_like(ids_BL)
    for b, seq in enumerate(sequences):
        ids_BL[b, : len(seq)] = seq
        mask_BL[b, : len(seq)] = 1
    return ids_BL, mask_BL


def offsets_of(lengths: Sequence[int]) -> np.ndarray:
    """seq_offsets [n + 1] of sequences with these numbers of rows."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


@dataclass(kw_only=True)
class PositionStats:
    """A batch's per-position arrays, flattened once over its rollouts (names: module docstring).

    Student numbers come from the trainer's own forward pass; teacher numbers from the scoring
    service. Fields accept anything np.asarray converts (lists, CPU tensors); teacher fields the
    request did not ask for are None. Call validate() before use; the diagnostics need every
    field (`complete()`).
    """

    student_topk_ids_NK: np.ndarray
    student_topk_logp_NK: np.ndarray
    student_token_logp_N: np.ndarray
    student_entropy_N: np.ndarray
    seq_offsets: np.ndarray
    teacher_token_logp_N: np.ndarray | None = None
    teacher_cand_logp_NK: np.ndarray | None = None
    teacher_topk_ids_Nk: np.ndarray | None = None
    teacher_topk_logp_Nk: np.ndarray | None = None
    teacher_entropy_N: np.ndarray | None = None
    # Episodes only (None for single completions, where both follow from seq_offsets): the
    # absolute token depth of each position (tokens since its episode's first assistant
    # token, context included) and its turn index (0 = first assistant turn).
    depth_N: np.ndarray | None = None
    turn_N: np.ndarray | None = None
    # A teacher of another tokenizer (opd.client.train.cross_tokenizer): each position's
    # aligned chunk within its rollout, and whether that chunk is one token on both sides
    # (where the teacher's top-k, candidate and entropy fields are defined; NaN / -1
    # elsewhere). None when every rollout was scored natively.
    chunk_N: np.ndarray | None = None
    one_to_one_N: np.ndarray | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, np.asarray(value))

    @staticmethod
    def from_rollouts(rollouts: Sequence[Rollout]) -> PositionStats:
        """Flatten rollouts in order; a teacher field absent from any rollout stays None."""
        kw: dict[str, np.ndarray | None] = {}
        for name in STUDENT_FIELDS + TEACHER_FIELDS:
            parts = [getattr(r, name + ROLLOUT_SUFFIX[name]) for r in rollouts]
            kw[name + FLAT_SUFFIX[name]] = (
                None if any(p is None for p in parts) else np.concatenate(parts)
            )
        kw["seq_offsets"] = offsets_of([r.completion_len for r in rollouts])
        if any(r.spans is not None for r in rollouts):
            kw["depth_N"] = np.concatenate([r.depth_T for r in rollouts])
            kw["turn_N"] = np.concatenate([r.turn_T for r in rollouts])
        if any(r.chunk_T is not None for r in rollouts):  # natively scored: a chunk per token
            kw["chunk_N"] = np.concatenate(
                [
                    r.chunk_T if r.chunk_T is not None else np.arange(r.completion_len)
                    for r in rollouts
                ]
            ).astype(np.int64)
            kw["one_to_one_N"] = np.concatenate(
                [
                    r.one_to_one_T
                    if r.one_to_one_T is not None
                    else np.ones(r.completion_len, dtype=bool)
                    for r in rollouts
                ]
            ).astype(bool)
        return PositionStats(**kw)

    @property
    def n_positions(self) -> int:
        return int(self.student_topk_ids_NK.shape[0])

    @property
    def n_sequences(self) -> int:
        return int(self.seq_offsets.shape[0]) - 1

    def complete(self) -> bool:
        """Whether every teacher field is present (the diagnostics need them all)."""
        return all(getattr(self, n + FLAT_SUFFIX[n]) is not None for n in TEACHER_FIELDS)

    def validate(self) -> PositionStats:
        """Check shapes, dtypes and offsets agree; raise ValueError naming the first bad field.

        Ragged data fails silently when misaligned (a mean over the wrong rows is still a
        number), so it is checked loudly once, here. Returns self for chaining.
        """
        missing = [
            n + FLAT_SUFFIX[n] for n in TEACHER_FIELDS if getattr(self, n + FLAT_SUFFIX[n]) is None
        ]
        if missing:
            raise ValueError(f"{missing[0]} is missing: the diagnostics need every teacher field")
        for name in _ID_FIELDS:
            dtype = getattr(self, name).dtype
            if not np.issubdtype(dtype, np.integer):
                raise ValueError(f"{name} must hold integers, got dtype {dtype}")
        ref_NK = self.student_topk_ids_NK
        if ref_NK.ndim != 2 or ref_NK.shape[1] == 0:
            raise ValueError(f"student_topk_ids_NK must be [N, K] with K >= 1, got {ref_NK.shape}")
        n_pos = ref_NK.shape[0]
        for name in ("student_topk_logp_NK", "teacher_cand_logp_NK"):
            if getattr(self, name).shape != ref_NK.shape:
                raise ValueError(
                    f"{name} has shape {getattr(self, name).shape}, expected {ref_NK.shape} "
                    "(same as student_topk_ids_NK)"
                )
        ref_Nk = self.teacher_topk_ids_Nk
        if ref_Nk.ndim != 2 or ref_Nk.shape[0] != n_pos or ref_Nk.shape[1] == 0:
            raise ValueError(
                f"teacher_topk_ids_Nk must be [N={n_pos}, k] with k >= 1, got {ref_Nk.shape}"
            )
        if self.teacher_topk_logp_Nk.shape != ref_Nk.shape:
            raise ValueError(
                f"teacher_topk_logp_Nk has shape {self.teacher_topk_logp_Nk.shape}, expected "
                f"{ref_Nk.shape} (same as teacher_topk_ids_Nk)"
            )
        for name in (
            "student_token_logp_N",
            "teacher_token_logp_N",
            "student_entropy_N",
            "teacher_entropy_N",
        ):
            if getattr(self, name).shape != (n_pos,):
                raise ValueError(
                    f"{name} has shape {getattr(self, name).shape}, expected ({n_pos},)"
                )
        for name in _EPISODE_FIELDS:
            value = getattr(self, name)
            if value is not None and (value.shape != (n_pos,) or value.dtype.kind not in "iu"):
                raise ValueError(f"{name} must be integers of shape ({n_pos},), got {value.shape}")
        if self.one_to_one_N is not None and self.one_to_one_N.shape != (n_pos,):
            raise ValueError(f"one_to_one_N must have shape ({n_pos},)")
        offs = self.seq_offsets
        if offs.ndim != 1 or offs.shape[0] < 1:
            raise ValueError(f"seq_offsets must be 1-D [n+1], got shape {offs.shape}")
        if offs[0] != 0 or offs[-1] != n_pos or (np.diff(offs) < 0).any():
            raise ValueError(
                f"seq_offsets must rise from 0 to N={n_pos} without decreasing, got "
                f"{offs[0]}..{offs[-1]}"
            )
        return self

    def sequences(self, start: int, stop: int) -> PositionStats:
        """The rows of sequences [start, stop), offsets rebased to 0 (a micro-batch's slice)."""
        a, b = int(self.seq_offsets[start]), int(self.seq_offsets[stop])
        kw = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[a:b]
            for f in fields(self)
            if f.name != "seq_offsets"
        }
        kw["seq_offsets"] = self.seq_offsets[start : stop + 1] - a
        return PositionStats(**kw)

    @staticmethod
    def concat(parts: Sequence[PositionStats]) -> PositionStats:
        """One bundle from several (e.g. micro-batches), offsets shifted by the rows before."""
        if not parts:
            raise ValueError("concat needs at least one PositionStats")
        kw: dict[str, np.ndarray | None] = {}
        for f in fields(PositionStats):
            if f.name == "seq_offsets":
                continue
            values = [getattr(p, f.name) for p in parts]
            kw[f.name] = None if any(v is None for v in values) else np.concatenate(values, axis=0)
        shifted = [np.zeros(1, dtype=np.int64)]
        base = 0
        for p in parts:
            offs = np.asarray(p.seq_offsets, dtype=np.int64)
            shifted.append(offs[1:] - offs[0] + base)
            base += int(offs[-1] - offs[0])
        kw["seq_offsets"] = np.concatenate(shifted)
        return PositionStats(**kw)


@dataclass
class TokenBatch:
    """A micro-batch for the student's loss pass: padded ids, and its PositionStats as tensors.

    Tensor fields carry the flat names of the schema (`teacher_cand_logp_NK`, ...); `target_N`
    is the sampled token y_t of each row. Teacher fields the request did not ask for are None.
    """

    ids_BL: torch.Tensor
    mask_BL: torch.Tensor
    positions: list[np.ndarray]  # per sequence, the trained positions (Rollout.positions)
    seq_offsets: torch.Tensor | None  # [n+1] over N; None in a row slice (`rows`)
    target_N: torch.Tensor
    student_token_logp_N: torch.Tensor
    student_topk_ids_NK: torch.Tensor
    student_topk_logp_NK: torch.Tensor
    teacher_token_logp_N: torch.Tensor | None
    teacher_cand_logp_NK: torch.Tensor | None
    teacher_topk_ids_Nk: torch.Tensor | None
    teacher_topk_logp_Nk: torch.Tensor | None
    # A cross-row quantity computed over the whole micro-batch before it is cut into row chunks
    # (opd.client.train.objectives.prepare_batch); None when the objective needs none.
    advantages_N: torch.Tensor | None = None
    # Off-policy target rows (re-anchoring with --reanchor-as target): per sequence the
    # positions of its teacher-written turns, and their ids (M rows over the batch); the loss
    # appends their negative log-likelihood after the N objective rows. None: no targets.
    target_positions: list[np.ndarray] | None = None
    target_ids_M: torch.Tensor | None = None
    # A teacher of another tokenizer: which rows are chunks of one token on both sides (the
    # top-k objectives' rows; the others train on the chunk's sampled-token reward), and
    # which teacher numbers exist (candidates that map, teacher ids that map; their NaN / -1
    # are stored as 0 in the tensors above). None: scored natively, every number exists.
    one_to_one_N: torch.Tensor | None = None
    teacher_cand_valid_NK: torch.Tensor | None = None
    teacher_topk_valid_Nk: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Rows [start, stop) of the per-position tensors, for the loss's LM-head chunks.

        A row range cuts across sequences, so `seq_offsets` is None in the slice: anything that
        needs sequence structure is computed on the whole batch first (prepare_batch)."""
        sliced = {
            f.name: _slice_rows(getattr(self, f.name), start, stop)
            for f in fields(self)
            if f.name.endswith(("_N", "_NK", "_Nk"))
        }
        return replace(self, seq_offsets=None, **sliced)

    @staticmethod
    def build(
        rollouts: Sequence[Rollout],
        stats: PositionStats,
        device: torch.device,
        targets: Sequence[np.ndarray] | None = None,
    ) -> TokenBatch:
        """`stats` holds exactly the rows of `rollouts` (PositionStats.sequences); `targets`:
        per rollout, the positions of its off-policy target rows (None or all empty: none)."""
        import torch

        ids_BL, mask_BL = pad_right([r.token_ids for r in rollouts])
        if targets is not None and not any(len(t) for t in targets):
            targets = None
        target_ids = None
        if targets is not None:
            ids = np.concatenate([r.token_ids[t] for r, t in zip(rollouts, targets, strict=True)])
            target_ids = torch.from_numpy(ids).to(device)

        def tensor(x: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if x is None else torch.from_numpy(x).to(device=device, dtype=dtype)

        cand, ids_k, logp_k = (
            stats.teacher_cand_logp_NK,
            stats.teacher_topk_ids_Nk,
            stats.teacher_topk_logp_Nk,
        )
        cross: dict[str, torch.Tensor | None] = {}
        if stats.one_to_one_N is not None:  # missing numbers: masks, and 0 in their place
            cross["one_to_one_N"] = tensor(stats.one_to_one_N, torch.bool)
            if cand is not None:
                cross["teacher_cand_valid_NK"] = tensor(~np.isnan(cand), torch.bool)
                cand = np.nan_to_num(cand, nan=0.0)
            if ids_k is not None and logp_k is not None:
                cross["teacher_topk_valid_Nk"] = tensor(ids_k >= 0, torch.bool)
                ids_k, logp_k = np.maximum(ids_k, 0), np.nan_to_num(logp_k, nan=0.0)

        return TokenBatch(
            ids_BL=torch.from_numpy(ids_BL).to(device),
            mask_BL=torch.from_numpy(mask_BL).to(device),
            positions=[r.positions for r in rollouts],
            seq_offsets=torch.from_numpy(stats.seq_offsets).to(device),
            target_N=torch.from_numpy(np.concatenate([r.completion for r in rollouts])).to(device),
            student_token_logp_N=tensor(stats.student_token_logp_N, torch.float32),
            student_topk_ids_NK=tensor(stats.student_topk_ids_NK, torch.long),
            student_topk_logp_NK=tensor(stats.student_topk_logp_NK, torch.float32),
            teacher_token_logp_N=tensor(stats.teacher_token_logp_N, torch.float32),
            teacher_cand_logp_NK=tensor(cand, torch.float32),
            teacher_topk_ids_Nk=tensor(ids_k, torch.long),
            teacher_topk_logp_Nk=tensor(logp_k, torch.float32),
            target_positions=None if targets is None else list(targets),
            target_ids_M=target_ids,
            **cross,
        )


def _slice_rows(x: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if x is None else x[start:stop]
