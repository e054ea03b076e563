"""Scoring the student's rollouts on a teacher with another tokenizer (cross-tokenizer OPD).

The student's episode is text: its prompt messages, each assistant turn (the text of the ids
the student sampled), the environment's messages between turns. The teacher sees that text as
it would see it: rendered with its own chat template and tokenized by its own tokenizer, which
the service hands out (GET /v1/tokenizer, cached here by its fingerprint). Each assistant
turn's text is aligned between the two tokenizations (opd.client.train.alignment) into chunks,
and the teacher's numbers come back onto the student's positions, so the objectives, the
diagnostics and everything after the bridge read the arrays they always read
(opd.client.train.positions), in the student's token space:

- `teacher_token_logp_T`: for a chunk c of n student tokens, each token gets
  log p_old(y_t) + (log q(c) - log p_old(c)) / n, where log q(c) and log p_old(c) sum each
  model's log-probs of the chunk's tokens. So the per-token reward log q - log p_old of the
  sampled-token objective is the chunk's reward split evenly over its tokens: it sums to the
  chunk's, the token-mean over a batch is the per-student-token sampled KL, and where a chunk
  is one token on both sides it is exactly that token's teacher log-prob. Why an even split
  and not the whole chunk reward on every token: the latter counts a chunk's reward once per
  token, so the loss would weigh text by how finely the student happens to split it.
- where a chunk is one token on both sides and the teacher's most likely token there maps to
  a student id (`one_to_one_T`, "comparable" rows), the two next-token distributions are
  about the same event, and top-k numbers compare through the vocabulary map (`VocabMap`: ids
  whose token strings are identical, and the two end-of-turn tokens): the teacher's log-prob
  at each of the student's top-K ids that map (`teacher_cand_logp_TK`, NaN where a candidate
  does not), the teacher's top-k mapped to student ids (`teacher_topk_ids_Tk`, -1 where one
  does not; the log-probs stay, so an unmapped id's mass falls into the tail), its entropy.
- elsewhere those top-k fields are NaN / -1: there is no next-token distribution of the
  teacher over the student's vocabulary there. The top-k objectives train those rows on the
  chunk's sampled-token reward instead (opd.client.train.objectives), like GOLD's hybrid.

The end of a turn: the student's end-of-turn token (a special token ending the turn) and the
teacher's (the first special tokens its template writes after an assistant message; its EOS
for a teacher without a chat template) are one chunk of their own, so the teacher judges when
the student stops. Where the student's turn was cut at its token budget, there is none.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from opd.client.train.alignment import align, decoded_spans, encoded_spans
from opd.client.train.rollouts import Rollout
from opd.modeling.embedded import cache_root
from opd.modeling.eos import eos_ids
from opd.modeling.tokenizer_files import load_tokenizer_folder, write_tokenizer_files
from opd.shared.chat import chat_prompt_ids
from opd.shared.fingerprint import fingerprint_hf_tokenizer
from opd.shared.packed import PackedRequest, PackedResult
from opd.shared.schemas import ScoreOptions, TokenizerFiles

# An assistant message's content while the teacher's template renders the conversation: the
# rendered text is cut at these, and the student's exact text goes where they were. Private-
# use code points, which no template writes.
_SENTINEL = "\ue000opd-turn-{}\ue001"


# ---- the teacher's tokenizer ------------------------------------------------------------------


def teacher_tokenizer(files: TokenizerFiles, cache_dir: Path | None = None) -> Any:
    """The teacher's tokenizer from GET /v1/tokenizer's files, kept under the cache by its
    fingerprint (written to a staging folder and renamed into place, so concurrent ranks
    never read half a folder). The rebuilt tokenizer's fingerprint must be the teacher's."""
    root = (cache_dir or cache_root()) / "tokenizers"
    folder = root / files.tokenizer_fingerprint[:32]
    if not (folder / "tokenizer.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            write_tokenizer_files(files.files, staging)
            if not folder.exists():  # another rank may have put it there meanwhile
                os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    tokenizer = load_tokenizer_folder(folder)
    if fingerprint_hf_tokenizer(tokenizer) != files.tokenizer_fingerprint:
        raise ValueError(
            "the teacher's tokenizer, rebuilt from GET /v1/tokenizer, has another fingerprint "
            "than the teacher publishes: its files do not describe the tokenizer it uses"
        )
    return tokenizer


# ---- the vocabulary map -----------------------------------------------------------------------


def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes, reversed (what byte-level BPE pieces are
    written in: "Ġ" is the byte 0x20)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """What each id stands for, as bytes (None: unknown), so that two vocabularies can be
    compared token by token: a special token by its content (marked, so it never equals
    text); a byte-level BPE piece (GPT-2, SmolLM2, Llama 3) through its byte table, partial
    UTF-8 bytes included; any other piece by its decoded text, read after an anchor token and
    cut (decoders that drop a leading space at the start of a text do not drop it then), a
    byte-fallback piece "<0xNN>" as its byte, a piece decoding to no complete character as
    None."""
    backend = tokenizer.backend_tokenizer
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    decoder = backend.decoder
    byte_level = decoder is not None and "ByteLevel" in decoder.__class__.__name__
    table = _byte_level_table() if byte_level else {}
    if not byte_level and decoder is not None:
        anchor_id = tokenizer("a", add_special_tokens=False)["input_ids"][0]
        anchor = tokenizer.convert_ids_to_tokens(anchor_id)
        head = len(decoder.decode([anchor]))
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append(None)
        elif i in special or i in added:
            out.append(b"\x00special:" + piece.encode() if i in special else piece.encode())
        elif byte_level:
            out.append(bytes(table[c] for c in piece) if all(c in table for c in piece) else None)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            text = decoder.decode([anchor, piece])[head:] if decoder is not None else piece
            out.append(None if not text or "\ufffd" in text else text.encode())
    return out


@dataclass(frozen=True)
class VocabMap:
    """Ids of the two vocabularies whose token strings are identical, both ways (-1: none):
    equal bytes (`token_bytes`), a special token only to a special token of the same content.
    Built once per student-teacher pair; where one vocabulary holds a string twice, the lowest
    id is taken."""

    student_to_teacher: np.ndarray  # int64 [V_student]
    teacher_to_student: np.ndarray  # int64 [V_teacher]

    @staticmethod
    def build(
        student: Any, teacher: Any, ends: tuple[Sequence[int], int] | None = None
    ) -> VocabMap:
        """`ends`: the student's end-of-turn ids and the teacher's; they mean the same event
        ("the turn ends here") whatever their strings, so they map to each other."""
        s_texts, t_texts = token_bytes(student), token_bytes(teacher)
        t_index: dict[bytes, int] = {}
        for i, text in enumerate(t_texts):
            if text is not None:
                t_index.setdefault(text, i)
        s2t = np.full(len(s_texts), -1, dtype=np.int64)
        t2s = np.full(len(t_texts), -1, dtype=np.int64)
        for i, text in enumerate(s_texts):
            j = t_index.get(text) if text is not None else None
            if j is not None and s2t[i] < 0:
                s2t[i] = j
                if t2s[j] < 0:
                    t2s[j] = i
        if ends is not None:
            student_ends, teacher_end = ends
            for i in student_ends:
                s2t[int(i)] = teacher_end
            t2s[teacher_end] = int(min(student_ends))
        return VocabMap(s2t, t2s)

    @property
    def mapped(self) -> int:
        return int((self.student_to_teacher >= 0).sum())

    def to_teacher(self, ids: np.ndarray) -> np.ndarray:
        return _lookup(self.student_to_teacher, ids)

    def to_student(self, ids: np.ndarray) -> np.ndarray:
        return _lookup(self.teacher_to_student, ids)


def _lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(table))
    return np.where(inside, table[np.clip(ids, 0, len(table) - 1)], -1)


# ---- one rollout on the teacher's side --------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One assistant turn of a rollout, seen by both tokenizers.

    text: the student's text of the turn (its end-of-turn token excluded); rows: the student's
    trained rows of the turn (indices into the rollout's T rows), in order; ended: the turn
    ends with an end-of-turn token (the last of `rows`), which is a chunk of its own."""

    text: str
    rows: np.ndarray
    student_spans: np.ndarray  # [len(rows) - ended, 2] character spans of the text ids
    ended: bool


@dataclass
class TeacherView:
    """A rollout as the teacher scores it: its ids, its scored spans (the assistant turns'
    text tokens and end tokens), and each scored row's chunk; with each student row's chunk.

    Chunks are numbered over the whole rollout, turn after turn; per chunk, `one_to_one_C`."""

    token_ids: np.ndarray  # int64 [L_teacher]
    spans: np.ndarray  # int64 [S, 2] scored ranges of token_ids
    student_chunk_T: np.ndarray  # int64 [T], the chunk of each trained student row
    teacher_chunk_U: np.ndarray  # int64 [U], the chunk of each scored teacher row
    one_to_one_C: np.ndarray  # bool [C]

    @property
    def n_chunks(self) -> int:
        return len(self.one_to_one_C)

    @cached_property
    def teacher_rows_T(self) -> np.ndarray:
        """For each student row in a one-to-one chunk, its teacher row; -1 elsewhere."""
        rows = np.full(len(self.student_chunk_T), -1, dtype=np.int64)
        first_u = np.full(self.n_chunks, -1, dtype=np.int64)
        first_u[self.teacher_chunk_U[::-1]] = np.arange(len(self.teacher_chunk_U))[::-1]
        one = self.one_to_one_C[self.student_chunk_T]
        rows[one] = first_u[self.student_chunk_T[one]]
        return rows


class TeacherRenderer:
    """Renders rollouts for one teacher tokenizer: the conversation through its chat template
    (or, for a teacher without one, the prompt as the teacher's tokenizer encodes it, BOS
    included, and its EOS as the end of the completion)."""

    def __init__(self, student: Any, teacher: Any) -> None:
        self.student, self.teacher = student, teacher
        self.student_special = set(student.all_special_ids)
        self.teacher_special = set(teacher.all_special_ids)
        self.has_template = bool(getattr(teacher, "chat_template", None))

    def end_of_turn_id(self) -> int:
        """The teacher's token for "the assistant's turn ends here": the last of the end ids
        its template writes after an assistant message (its EOS without a template)."""
        if not self.has_template:
            return int(self.teacher.eos_token_id)
        messages = [{"role": "user", "content": "Hello."}, {"role": "assistant"}]
        return int(self._end_ids(self._encode(self.segments(messages, ["Hi."])[1]))[-1])

    # -- the student's side: turns as text ------------------------------------------------------

    def turns(self, rollout: Rollout) -> list[Turn]:
        out = []
        row = 0
        for a, b in rollout.scored_spans.tolist():
            ids = rollout.token_ids[a:b]
            ended = len(ids) > 0 and int(ids[-1]) in self.student_special
            text_ids = ids[:-1] if ended else ids
            text, spans = decoded_spans(self.student, text_ids)
            out.append(Turn(text, np.arange(row, row + b - a), spans, ended))
            row += b - a
        return out

    # -- the teacher's side ---------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.teacher(text, add_special_tokens=False)["input_ids"])

    def _end_ids(self, after_ids: list[int]) -> list[int]:
        """The teacher's end-of-turn tokens: the ids its template writes after an assistant
        message (`after_ids`), up to and including the first special token (its EOS when
        there is none)."""
        for i, token in enumerate(after_ids):
            if token in self.teacher_special:
                return after_ids[: i + 1]
        return [int(self.teacher.eos_token_id)]

    def segments(self, messages: list[dict], texts: Sequence[str]) -> list[str]:
        """The teacher's rendering of `messages`, cut around the assistant contents: returns
        len(texts) + 1 template pieces (before the first turn, between turns, after the last).
        `messages` hold the non-assistant messages in order, with one {"role": "assistant"}
        per turn whose content is filled in here."""
        if not self.has_template:
            if len(texts) != 1 or [m["role"] for m in messages] != ["user", "assistant"]:
                raise ValueError(
                    "the teacher has no chat template: across tokenizers it can score single "
                    "completions of one user prompt only, not episodes"
                )
            return ["", ""]
        filled, j = [], 0
        for m in messages:
            if m.get("role") == "assistant":
                m = {**m, "content": _SENTINEL.format(j)}
                j += 1
            filled.append(m)
        rendered = self.teacher.apply_chat_template(filled, tokenize=False)
        pieces = []
        for j in range(len(texts)):
            before, found, rendered = rendered.partition(_SENTINEL.format(j))
            if not found:
                raise ValueError("the teacher's chat template dropped an assistant message")
            pieces.append(before)
        return [*pieces, rendered]

    def view(self, rollout: Rollout, messages: list[dict]) -> TeacherView:
        """The teacher's ids of the rollout and the chunks of every turn."""
        turns = self.turns(rollout)
        pieces = self.segments(messages, [t.text for t in turns])
        if self.has_template:
            ids = self._encode(pieces[0])
        else:
            ids = chat_prompt_ids(self.teacher, messages[0]["content"])
        spans, s_chunks, t_chunks, one_to_one = [], [], [], []
        n_chunks = 0
        for j, turn in enumerate(turns):
            t_ids, t_spans = encoded_spans(self.teacher, turn.text)
            a = align(len(turn.text), turn.student_spans, t_spans) if turn.text else None
            # ids that decode to no text at all (bytes a vocabulary cannot spell) have nothing
            # to align with: they join the end-of-turn chunk, or a chunk with no teacher side
            # (no reward) when the turn was cut
            silent = len(turn.student_spans) if a is None else 0
            start = len(ids)
            ids.extend(t_ids.tolist())
            after_ids = self._encode(pieces[j + 1]) if self.has_template else []
            end_ids = self._end_ids(after_ids) if turn.ended else []
            ids.extend(end_ids)
            if len(ids) > start:
                spans.append((start, len(ids)))
            n_text = a.n_chunks if a is not None else 0
            if a is not None:
                s_chunks.append(a.student_chunk_S + n_chunks)
                t_chunks.append(a.teacher_chunk_T + n_chunks)
                one_to_one.append(a.one_to_one_C)
            if turn.ended or silent:
                end_chunk = n_chunks + n_text
                s_chunks.append(np.full(silent + int(turn.ended), end_chunk, dtype=np.int64))
                t_chunks.append(np.full(len(end_ids), end_chunk, dtype=np.int64))
                one_to_one.append(np.array([len(end_ids) == 1 and silent + turn.ended == 1]))
            n_chunks += n_text + int(turn.ended or silent > 0)
            if j + 1 < len(turns):  # the template's text up to the next turn: context
                ids.extend(after_ids[len(end_ids) :])
        return TeacherView(
            np.asarray(ids, dtype=np.int64),
            np.asarray(spans, dtype=np.int64).reshape(-1, 2),
            _cat(s_chunks),
            _cat(t_chunks),
            np.concatenate(one_to_one) if one_to_one else np.zeros(0, dtype=bool),
        )


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


# ---- the request and its answer ---------------------------------------------------------------


def single_prompt_messages(prompt: str) -> list[dict]:
    """A single completion's conversation: the user prompt and the assistant turn."""
    return [{"role": "user", "content": prompt}, {"role": "assistant"}]


def conversations(prompts: Sequence[Any]) -> Callable[[Rollout], list[dict]]:
    """CrossTokenizer's `messages` for rollouts of `prompts` (indexed by prompt_index): an
    episode's own conversation, up to the turns it kept (a horizon may have cut the rest), or
    a prompt's single user turn."""

    def messages(rollout: Rollout) -> list[dict]:
        if rollout.episode is not None:
            return rollout.episode.conversation(len(rollout.scored_spans))
        return single_prompt_messages(prompts[rollout.prompt_index])

    return messages


@dataclass
class CrossTokenizer:
    """What TeacherBridge uses in place of the native request/attach for a teacher of another
    tokenizer. `messages(rollout)` gives the rollout's conversation without the assistant
    contents (single_prompt_messages for a prompt; an episode's opening and environment
    messages), one {"role": "assistant"} per trained turn."""

    renderer: TeacherRenderer
    vocab: VocabMap
    messages: Callable[[Rollout], list[dict]]

    def request(
        self, rollouts: list[Rollout], options: ScoreOptions, candidates: bool
    ) -> tuple[PackedRequest, list[TeacherView]]:
        """The teacher's request for `rollouts` (its top-1 always: `attach_view` reads it)."""
        views = [self.renderer.view(r, self.messages(r)) for r in rollouts]
        options = options.model_copy(update={"top_k": max(options.top_k, 1)})
        cands = None
        if candidates:
            cands = [self._candidates(r, v) for r, v in zip(rollouts, views, strict=True)]
        request = PackedRequest.from_arrays(
            [v.token_ids for v in views],
            [int(v.spans[0, 0]) for v in views],
            cands,
            options,
            spans=[[(int(a), int(b)) for a, b in v.spans] for v in views],
        )
        return request, views

    def _candidates(self, rollout: Rollout, view: TeacherView) -> np.ndarray:
        """[U, K] teacher ids to score per teacher row: the student's top-K mapped, on rows of
        one-to-one chunks (0 as a filler elsewhere and for ids that do not map)."""
        k = rollout.student_topk_ids_TK.shape[1]
        out = np.zeros((len(view.teacher_chunk_U), k), dtype=np.int64)
        rows = view.teacher_rows_T
        has = rows >= 0
        mapped = self.vocab.to_teacher(rollout.student_topk_ids_TK[has])
        out[rows[has]] = np.maximum(mapped, 0)
        return out

    def attach(
        self,
        rollouts: list[Rollout],
        views: list[TeacherView],
        result: PackedResult,
        top_k: int,
    ) -> None:
        """The answer onto the rollouts; `top_k`: what the caller asked for (0: the teacher's
        top-k fields stay None, its top-1 only decides which rows compare)."""
        for rollout, view, scores in zip(rollouts, views, result.sequences(), strict=True):
            attach_view(rollout, view, scores, self.vocab, top_k)


def attach_view(
    rollout: Rollout, view: TeacherView, scores: Any, vocab: VocabMap, top_k: int
) -> None:
    """The teacher's numbers for a rollout's teacher rows, onto its student rows (the module
    docstring says what each field holds). A row compares top-k numbers only where its chunk
    is one token on both sides *and* the teacher's most likely token there maps to a student
    id: where the teacher would rather write a token the student cannot (a two-digit token
    where the student writes digits), its numbers at the student's ids are about a text the
    teacher does not mean (its "1" is a 1 followed by no digit), and the row trains on the
    chunk's reward instead."""
    chunk_T, n = view.student_chunk_T, view.n_chunks
    student_T = np.asarray(rollout.student_token_logp_T, np.float64)
    tq_C = np.bincount(view.teacher_chunk_U, np.asarray(scores.token_logprobs, np.float64), n)
    sp_C = np.bincount(chunk_T, student_T, n)
    size_C = np.maximum(np.bincount(chunk_T, minlength=n), 1)
    gap_C = np.where(np.bincount(view.teacher_chunk_U, minlength=n) > 0, tq_C - sp_C, 0.0)
    rollout.teacher_token_logp_T = (student_T + (gap_C / size_C)[chunk_T]).astype(np.float32)
    rows = view.teacher_rows_T
    has = rows >= 0
    top1 = vocab.to_student(np.asarray(scores.top_k_ids)[rows[has], 0])
    has[np.flatnonzero(has)[top1 < 0]] = False
    T = len(chunk_T)
    if scores.entropy is not None:
        entropy = np.full(T, np.nan, dtype=np.float32)
        entropy[has] = scores.entropy[rows[has]]
        rollout.teacher_entropy_T = entropy
    if scores.candidate_logprobs is not None:
        cand = np.full(rollout.student_topk_ids_TK.shape, np.nan, dtype=np.float32)
        mapped = vocab.to_teacher(rollout.student_topk_ids_TK[has]) >= 0
        cand[has] = np.where(mapped, scores.candidate_logprobs[rows[has]], np.nan)
        rollout.teacher_cand_logp_TK = cand
    if top_k:
        k = top_k
        ids = np.full((T, k), -1, dtype=np.int64)
        logp = np.full((T, k), np.nan, dtype=np.float32)
        ids[has] = vocab.to_student(scores.top_k_ids[rows[has], :k])
        logp[has] = scores.top_k_logprobs[rows[has], :k]
        rollout.teacher_topk_ids_Tk = ids
        rollout.teacher_topk_logp_Tk = logp
    rollout.chunk_T = chunk_T
    rollout.one_to_one_T = has


# ---- connecting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossSetup:
    """How a command meets teachers of other tokenizers: `mode` off (a teacher of another
    tokenizer is refused, as always), auto (such a teacher is scored across tokenizers, one of
    the student's own natively) or always (every teacher through the cross-tokenizer path: a
    check that it matches the native one). `messages`: as CrossTokenizer's."""

    mode: str
    student: Any
    messages: Callable[[Rollout], list[dict]]


_VOCAB_MAPS: dict[tuple[str, str], VocabMap] = {}


def vocab_map(student: Any, teacher: Any) -> VocabMap:
    """The pair's VocabMap, built once per process (replicas and resumes share it), with the
    student's end-of-turn ids (its EOS ids) mapped to the teacher's end-of-turn token."""
    key = (fingerprint_hf_tokenizer(student), fingerprint_hf_tokenizer(teacher))
    if key not in _VOCAB_MAPS:
        student_ends = sorted(eos_ids(student, None))
        teacher_end = TeacherRenderer(student, teacher).end_of_turn_id()
        _VOCAB_MAPS[key] = VocabMap.build(student, teacher, (student_ends, teacher_end))
    return _VOCAB_MAPS[key]


def cross_connect(
    bridge: Any, info: Any, setup: CrossSetup, student_fingerprint: str
) -> str | None:
    """Set `bridge` up for cross-tokenizer scoring when `setup` says this teacher needs it;
    returns the line saying so up front (None: the teacher is scored natively)."""
    same = info.tokenizer_fingerprint == student_fingerprint
    if setup.mode == "off" or (same and setup.mode == "auto"):
        return None
    teacher = teacher_tokenizer(bridge.tokenizer())
    vocab = vocab_map(setup.student, teacher)
    bridge.cross = CrossTokenizer(TeacherRenderer(setup.student, teacher), vocab, setup.messages)
    how = "the student's own tokenizer, forced" if same else "another tokenizer"
    return (
        f"teacher {info.name}: {how}, scored across tokenizers ({len(teacher):,} ids; "
        f"{vocab.mapped:,} of the student's {len(setup.student):,} map by identical strings): "
        "rewards per aligned text chunk, top-k where a chunk is one token on both sides"
    )
