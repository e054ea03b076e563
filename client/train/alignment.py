"""Two tokenizations of one text, aligned into chunks: what cross-tokenizer OPD compares.

A student and a teacher of different families cut the same text into different tokens, so
their per-token log-probs are not about the same events. They are comparable over pieces of
text both cut at: a *chunk* is a span of the text whose two ends are token boundaries in both
tokenizations, and the chunks here are the smallest such spans (the "comparable chunks" of
ALM, arXiv 2503.20083; the dual-pointer walk of DPCA, arXiv 2606.09456, finds the same ones).
Over a chunk, each model's log-prob of the text is the sum of its tokens' log-probs there,
and both are conditioned on the same text before it.

Token spans are character ranges [start, end) into the text, one row per token in order:
the teacher's come from its fast tokenizer's offsets (`encoded_spans`); the student's from
decoding its own sampled ids incrementally (`decoded_spans`, tokenizers' DecodeStream), since
sampled ids are often not the tokenizer's own encoding of their text and cannot be re-encoded.

Where a text can be cut (`cut_offsets`): before a token that starts at c, when no earlier
token reaches past c and the token before it started before c. So a character split over
several byte tokens (an emoji in byte-level BPE, SentencePiece's byte fallback) is never cut
inside, a token of no width (bytes still waiting for the rest of their character) joins the
token that completes it, and overlapping offsets (GPT-2 gives two byte tokens of one emoji
(11, 13) and (12, 13)) keep their tokens together. Characters no token covers stay inside the
chunk around them. A chunk therefore holds at least one token of each side (`align` checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def cut_offsets(spans_S2: np.ndarray, length: int) -> np.ndarray:
    """The character offsets where this tokenization of a `length`-character text can be cut:
    0, `length`, and the start of every token that begins a new position no earlier token
    reaches past (module docstring). Sorted int64."""
    spans = np.asarray(spans_S2, dtype=np.int64).reshape(-1, 2)
    cuts = [np.array([0, length], dtype=np.int64)]
    if len(spans) > 1:
        starts = spans[1:, 0]
        reach = np.maximum.accumulate(spans[:-1, 1])  # furthest end of every token before
        ok = (starts > spans[:-1, 0]) & (reach <= starts) & (starts > 0) & (starts < length)
        cuts.append(starts[ok])
    return np.unique(np.concatenate(cuts))


@dataclass(frozen=True)
class Alignment:
    """The chunks of one text under two tokenizations.

    bounds_C1: int64 [C + 1], chunk c is characters [bounds[c], bounds[c + 1]);
    student_chunk_S / teacher_chunk_T: the chunk of each student / teacher token, in token
    order (non-decreasing; every chunk has at least one token of each side)."""

    bounds_C1: np.ndarray
    student_chunk_S: np.ndarray
    teacher_chunk_T: np.ndarray

    @property
    def n_chunks(self) -> int:
        return len(self.bounds_C1) - 1

    @property
    def student_counts_C(self) -> np.ndarray:
        return np.bincount(self.student_chunk_S, minlength=self.n_chunks)

    @property
    def teacher_counts_C(self) -> np.ndarray:
        return np.bincount(self.teacher_chunk_T, minlength=self.n_chunks)

    @property
    def one_to_one_C(self) -> np.ndarray:
        """Chunks that are exactly one token on both sides: where next-token distributions of
        the two models are about the same event, so top-k numbers can be compared."""
        return (self.student_counts_C == 1) & (self.teacher_counts_C == 1)

    def student_sums(self, values_S: np.ndarray) -> np.ndarray:
        """Per chunk, the sum of a per-student-token value (a log-prob of the chunk's text)."""
        return _sums(self.student_chunk_S, values_S, self.n_chunks)

    def teacher_sums(self, values_T: np.ndarray) -> np.ndarray:
        return _sums(self.teacher_chunk_T, values_T, self.n_chunks)

    def texts(self, text: str) -> list[str]:
        """The chunks' texts, in order (they concatenate to `text`)."""
        b = self.bounds_C1.tolist()
        return [text[b[c] : b[c + 1]] for c in range(self.n_chunks)]


def _sums(chunk: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(chunk, weights=np.asarray(values, np.float64), minlength=n)


def _chunk_of(spans_S2: np.ndarray, bounds_C1: np.ndarray) -> np.ndarray:
    """The chunk of each token: the last bound at or before its start (tokens of no width at
    the very end of the text belong to the last chunk)."""
    starts = np.asarray(spans_S2, dtype=np.int64).reshape(-1, 2)[:, 0]
    n_chunks = max(len(bounds_C1) - 1, 1)
    return np.clip(np.searchsorted(bounds_C1, starts, side="right") - 1, 0, n_chunks - 1)


def align(length: int, student_spans_S2: np.ndarray, teacher_spans_T2: np.ndarray) -> Alignment:
    """The smallest chunks of a `length`-character text whose ends are cut points of both
    tokenizations (`cut_offsets`). A chunk left without a token on one side (characters only
    one side covers at the start of the text) is merged into its neighbour, so every chunk
    compares a log-prob of the student's with one of the teacher's."""
    student = np.asarray(student_spans_S2, dtype=np.int64).reshape(-1, 2)
    teacher = np.asarray(teacher_spans_T2, dtype=np.int64).reshape(-1, 2)
    if (len(student) == 0) != (len(teacher) == 0):
        side = "student" if len(student) == 0 else "teacher"
        raise ValueError(f"align: the {side} has no tokens for a {length}-character text")
    bounds = np.intersect1d(cut_offsets(student, length), cut_offsets(teacher, length))
    if len(bounds) < 2:  # an empty text: one chunk of no width holds whatever tokens exist
        bounds = np.array([0, max(length, 0)], dtype=np.int64)
    while True:
        s_chunk, t_chunk = _chunk_of(student, bounds), _chunk_of(teacher, bounds)
        n = len(bounds) - 1
        empty = (np.bincount(s_chunk, minlength=n) == 0) | (np.bincount(t_chunk, minlength=n) == 0)
        if len(student) == 0 or not empty.any() or n == 1:
            return Alignment(bounds, s_chunk, t_chunk)
        c = int(np.argmax(empty))
        bounds = np.delete(bounds, c if c > 0 else 1)  # merge into the previous (or next) chunk


def decoded_spans(tokenizer: Any, ids: list[int] | np.ndarray) -> tuple[str, np.ndarray]:
    """The text of sampled `ids` and each id's character span in it, by incremental decoding
    (tokenizers' DecodeStream over the fast tokenizer, special tokens kept as their text).

    An id that completes no character yet (the first bytes of a multi-byte character) gets a
    span of no width where its character will start; the id that completes it spans the whole
    character. The text is the tokenizer's own decoding of the ids: what the stream holds back
    at the end (bytes of an unfinished character, a final U+FFFD) joins the last id's span.
    Where the stream gives up (Gemma's byte fallback turns a run of bytes with an invalid one
    into U+FFFD after the fact, and DecodeStream raises), the spans come from decoding each
    prefix instead (`_prefix_spans`)."""
    from tokenizers.decoders import DecodeStream

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("cross-tokenizer alignment needs a fast tokenizer (tokenizer.json)")
    ids = np.asarray(ids, dtype=np.int64).tolist()
    full = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    stream = DecodeStream(skip_special_tokens=False)
    pieces: list[str] = []
    spans = np.zeros((len(ids), 2), dtype=np.int64)
    at = 0
    try:
        for i, token in enumerate(ids):
            piece = stream.step(backend, token)
            spans[i, 0] = at
            if piece:
                pieces.append(piece)
                at += len(piece)
            spans[i, 1] = at
    except Exception:  # noqa: BLE001 - the stream's "Invalid prefix": decode prefixes instead
        return full, _prefix_spans(tokenizer, ids, full)
    text = "".join(pieces)
    if text != full and full.startswith(text) and ids:  # held back at the end
        spans[-1, 1] = len(full)
        return full, spans
    return text, spans


def _prefix_spans(tokenizer: Any, ids: list[int], full: str) -> np.ndarray:
    """Spans from decoding every prefix (quadratic: only where DecodeStream gives up): id i
    starts at the longest decoded prefix before it that is a prefix of the whole text, and
    ends where the next one starts (the last one at the end of the text)."""
    starts = np.zeros(len(ids), dtype=np.int64)
    at = 0
    for i in range(1, len(ids)):
        prefix = tokenizer.decode(
            ids[:i], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if full.startswith(prefix):
            at = max(at, len(prefix))
        starts[i] = at
    ends = np.append(starts[1:], len(full))
    return np.stack([starts, ends], axis=1)


def encoded_spans(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """The tokenizer's own ids of `text` (no special tokens added) and their character spans
    (the fast tokenizer's offsets)."""
    if not text:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ids, spans
