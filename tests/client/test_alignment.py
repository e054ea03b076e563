"""Cross-tokenizer alignment (opd.client.train.alignment) on real tokenizers, checked against
its docstrings: SmolLM2's and GPT-2's byte-level BPEs and Gemma 3's byte-fallback tokenizer,
every pair of them and each with itself.

The checks are written from the spec, not the code: a direct (quadratic) reading of "where a
text can be cut" is the reference for cut points, and the chunks must be exactly the smallest
spans between common cut points; prefix decoding (`tokenizer.decode`) is the reference for
the spans of sampled ids.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd.client.train.alignment import (
    Alignment,
    align,
    cut_offsets,
    decoded_spans,
    encoded_spans,
)
from tests.support.tokenizers import gemma3_tokenizer, gpt2_tokenizer, smollm2_tokenizer

# hypothesis examples per random test; OPD_ALIGN_EXAMPLES=2000 for a long hunt
EXAMPLES = int(os.environ.get("OPD_ALIGN_EXAMPLES", "40"))

LOADERS = {"smollm2": smollm2_tokenizer, "gpt2": gpt2_tokenizer, "gemma3": gemma3_tokenizer}
# student, teacher
PAIRS = [
    ("smollm2", "gpt2"),
    ("smollm2", "gemma3"),
    ("gpt2", "gemma3"),
    ("smollm2", "smollm2"),
    ("gpt2", "gpt2"),
    ("gemma3", "gemma3"),
]
PAIR_IDS = [f"{s}-{t}" for s, t in PAIRS]
# byte-level BPEs without a normalizer: decoding their own encoding gives the text back exactly
# (Gemma's normalizer writes " " as "▁" and its decoder reads every "▁" back as " ").
LOSSLESS = {"smollm2", "gpt2"}
# ...except that SmolLM2's vocabulary lacks eight valid UTF-8 bytes (0x04, 0x06, 0x13, 0x14,
# 0x16, 0x1D and the lead bytes 0xF1, 0xF2 of planes 4-11): its encoding silently drops them.
SMOLLM2_MISSING_BYTES = bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2])


def represents(name: str, text: str) -> bool:
    """Whether tokenizer `name` encodes every byte of `text` (so its offsets cover the text)."""
    return name != "smollm2" or not set(text.encode("utf-8")) & set(SMOLLM2_MISSING_BYTES)


TEXTS = {
    "plain": "The quick brown fox jumps over the lazy dog.",
    "spaces": "  leading, trailing   and   multiple  spaces   ",
    "one-space": " ",
    "whitespace": "\ttabs\tand\nnewlines\n\n\r\n  \t mixed \n",
    "digits": "pi is 3.14159, not 12345678 or 0.5e-10; 1,000,000 + 42 = 1000042",
    "punctuation": "Wait!!! What?!?... (yes) [no] {maybe} --- ~~~ @@## $$%% ^^&&** ;;::",
    "accented": "Ça va? Déjà vu, naïve façade, São Paulo, Ærøskøbing, Łódź, Đorđe, Ångström",
    "cjk": "東京は日本の首都です。中文字符测试，한국어 텍스트",
    "emoji": "hi 😀 family 👩‍👩‍👧 flag 🇫🇷🇯🇵 thumbs 👍🏽 heart ❤️ end",
    "emoji-only": "👩‍👩‍👧",
    "rare-chars": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 ꙮ ŉ ǅ ﬁ ㎏ Ⅻ \u00a0nbsp \u200bzwsp e\u0301 \x00\x01\x7f",
    "chatml": "<|im_start|>assistant\nThe answer is 4.<|im_end|>\n<|im_start|>user\nok",
    "gemma-turn": "<start_of_turn>model\nSure!<end_of_turn>\n",
    "endoftext": "first<|endoftext|>second <|endoftext|>",
    "code": "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "empty": "",
}

CHAR_ALPHABET = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\ufffd"),
    st.sampled_from(list(" \t\n\r.,!?-0123456789aeéü中文字東京😀👍🏽❤️\u200d\ufe0f")),
)
PIECES = st.sampled_from(
    [
        " ",
        "  ",
        "\n",
        "\t",
        "the",
        " world",
        "3.14159",
        "12345678",
        "!!!",
        "...",
        "naïve",
        "日本語",
        "👩‍👩‍👧",
        "🇫🇷",
        "👍🏽",
        "<|im_start|>",
        "<|im_end|>",
        "<start_of_turn>",
        "<|endoftext|>",
    ]
)
RANDOM_TEXT = st.lists(st.one_of(st.text(CHAR_ALPHABET, max_size=12), PIECES), max_size=8).map(
    "".join
)


# --- references, written from the module docstring -----------------------------------------


def reference_cuts(spans: np.ndarray, length: int) -> set[int]:
    """Where a text can be cut, read directly off the module docstring: 0, `length`, and c
    strictly inside the text before a token i that starts at c, when no earlier token reaches
    past c and token i - 1 started before c."""
    spans = np.asarray(spans).reshape(-1, 2).tolist()
    cuts = {0, length}
    for c in range(1, length):
        for i in range(1, len(spans)):
            if spans[i][0] == c and spans[i - 1][0] < c and all(spans[j][1] <= c for j in range(i)):
                cuts.add(c)
                break
    return cuts


def reference_chunk(start: int, bounds: list[int]) -> int:
    """The chunk a token starting at `start` belongs to: the one its start lies in; a token of
    no width at the very end of the text belongs to the last chunk."""
    n = len(bounds) - 1
    for c in range(n):
        if bounds[c] <= start < bounds[c + 1]:
            return c
    return n - 1


def reference_bounds(length: int, student: np.ndarray, teacher: np.ndarray) -> list[int]:
    """align's bounds by brute force: every offset 0..length that is a cut point of both sides,
    then (the docstring's exception) a chunk without a token on one side merged into its
    neighbour, the previous one, or the next one for the first chunk."""
    both = reference_cuts(student, length) & reference_cuts(teacher, length)
    bounds = [c for c in range(length + 1) if c in both]
    if len(bounds) < 2:
        bounds = [0, length]
    while len(bounds) > 2:
        n = len(bounds) - 1
        s = {reference_chunk(int(a), bounds) for a, _ in np.asarray(student).reshape(-1, 2)}
        t = {reference_chunk(int(a), bounds) for a, _ in np.asarray(teacher).reshape(-1, 2)}
        empty = [c for c in range(n) if c not in s or c not in t]
        if not empty:
            break
        c = empty[0]
        del bounds[c if c > 0 else 1]
    return bounds


def check_alignment(text: str, student: np.ndarray, teacher: np.ndarray, a: Alignment) -> None:
    """Every property the docstrings promise of the chunks of `text`."""
    length = len(text)
    student = np.asarray(student).reshape(-1, 2)
    teacher = np.asarray(teacher).reshape(-1, 2)
    bounds = a.bounds_C1.tolist()
    n = a.n_chunks
    assert n == len(bounds) - 1 >= 1

    # cover the text exactly and in order
    assert bounds[0] == 0 and bounds[-1] == length
    if length:
        assert all(x < y for x, y in zip(bounds, bounds[1:], strict=False)), bounds
    else:
        assert bounds == [0, 0]
    assert "".join(a.texts(text)) == text
    assert len(a.texts(text)) == n

    # one chunk per token, in token order
    for spans, chunk in ((student, a.student_chunk_S), (teacher, a.teacher_chunk_T)):
        assert chunk.shape == (len(spans),)
        if len(chunk):
            assert np.all(np.diff(chunk) >= 0), chunk
            assert chunk.min() >= 0 and chunk.max() < n
        for (start, end), c in zip(spans.tolist(), chunk.tolist(), strict=True):
            lo, hi = bounds[c], bounds[c + 1]
            if end > start:  # the token lies inside its chunk
                assert lo <= start and end <= hi, (start, end, lo, hi)
            else:  # no width: inside, or at the very end of the text
                assert lo <= start <= hi and (start < hi or c == n - 1), (start, lo, hi)
            assert c == reference_chunk(start, bounds)

    # every chunk compares at least one token of each side
    if length:
        assert np.all(a.student_counts_C >= 1) and np.all(a.teacher_counts_C >= 1)
        assert np.array_equal(a.one_to_one_C, (a.student_counts_C == 1) & (a.teacher_counts_C == 1))

    # bounds are cut points of both sides, by the function and by the docstring's definition
    s_cuts, t_cuts = reference_cuts(student, length), reference_cuts(teacher, length)
    assert sorted(s_cuts) == cut_offsets(student, length).tolist()
    assert sorted(t_cuts) == cut_offsets(teacher, length).tolist()
    assert set(bounds) <= s_cuts & t_cuts

    # and the chunks are the smallest, up to the merges of chunks missing a side
    assert bounds == reference_bounds(length, student, teacher)

    # the sums are per-chunk partitions of the per-token values
    for spans, sums, counts in (
        (student, a.student_sums, a.student_counts_C),
        (teacher, a.teacher_sums, a.teacher_counts_C),
    ):
        ones = sums(np.ones(len(spans)))
        assert ones.shape == (n,)
        assert np.array_equal(ones, counts.astype(np.float64))
        assert ones.sum() == len(spans)
        values = np.random.default_rng(len(spans)).normal(size=len(spans))
        got = sums(values)
        assert np.isclose(got.sum(), values.sum())
        chunk = a.student_chunk_S if spans is student else a.teacher_chunk_T
        for c in range(n):
            assert np.isclose(got[c], values[chunk == c].sum())


def check_coverage(text: str, spans: np.ndarray, chunk: np.ndarray, bounds: list[int]) -> None:
    """Each side's tokens of a chunk spell exactly that chunk's text: the characters their
    (nonzero-width) spans cover are exactly the chunk's characters."""
    for c in range(len(bounds) - 1):
        covered: set[int] = set()
        for start, end in spans[chunk == c].tolist():
            covered.update(range(start, end))
        assert covered == set(range(bounds[c], bounds[c + 1])), (c, text[bounds[c] : bounds[c + 1]])


def check_decoded(tok, ids: list[int], text: str, spans: np.ndarray) -> None:
    """decoded_spans' text and spans of `ids` (any ids, canonical or not), against decoding."""
    from tokenizers.decoders import DecodeStream

    assert spans.shape == (len(ids), 2)
    if len(ids):
        assert spans[0, 0] == 0 and spans[-1, 1] == len(text)
        assert np.all(spans[:, 0] <= spans[:, 1])
        assert np.array_equal(spans[1:, 0], spans[:-1, 1])  # contiguous, so non-decreasing
    else:
        assert text == ""
    # the text is the tokenizer's own decoding of the ids, unless that decoding rewrote text
    # the stream had already given (Gemma's byte fallback turns a whole run with an invalid
    # byte into U+FFFD): then the stream's text
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    full, streamed = tok.decode(ids, **kw), _streamed(tok, ids)
    assert text == (full if streamed is None or full.startswith(streamed) else streamed)
    if streamed is None:
        # the stream gave up (Gemma's byte fallback rewrote bytes it had already given, e.g.
        # <0x00> then <0x80>): its pieces are not the text, whose spans come from decoding
        # prefixes; contiguity and coverage are checked above
        return
    # the pieces concatenate: span i's text is the piece the stream gave for id i, except what
    # the stream still held back at the end (an unfinished character, a final U+FFFD), which
    # joins the last id's span
    stream = DecodeStream(skip_special_tokens=False)
    for i, token in enumerate(ids):
        piece = stream.step(tok.backend_tokenizer, token) or ""
        if i + 1 < len(ids):
            assert text[spans[i, 0] : spans[i, 1]] == piece
        else:
            assert text[spans[i, 0] : spans[i, 1]].startswith(piece)


def _streamed(tok, ids: list[int]) -> str | None:
    """The stream's text of `ids`; None where it gives up (Gemma's "Invalid prefix")."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    try:
        return "".join(stream.step(tok.backend_tokenizer, t) or "" for t in ids)
    except Exception:  # noqa: BLE001 - Gemma's "Invalid prefix": no stream text to prefer
        return None


def prefix_decodes(tok, ids: list[int], text: str, spans: np.ndarray) -> None:
    """Against decoding every prefix of the ids (for texts without U+FFFD): where the prefix
    decodes to whole characters, the text up to the id's span end is that decode; where it ends
    in bytes still waiting for the rest of their character, the id has no width."""
    for i in range(len(ids)):
        prefix = tok.decode(
            ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if prefix.endswith("\ufffd"):
            assert spans[i, 0] == spans[i, 1], (i, prefix)
        else:
            assert text[: spans[i, 1]] == prefix, (i, prefix)


def student_side(name: str, text: str):
    """A student that sampled the canonical ids of `text`: the text and spans its decoding gives
    (the text itself for the lossless tokenizers), plus its ids and offsets."""
    tok = LOADERS[name]()
    ids, offsets = encoded_spans(tok, text)
    decoded, spans = decoded_spans(tok, ids)
    if name in LOSSLESS and represents(name, text):
        assert decoded == text
    elif represents(name, text):
        assert decoded == tok.decode(ids.tolist(), clean_up_tokenization_spaces=False)
    return ids.tolist(), decoded, spans, offsets


def run_pair(student_name: str, teacher_name: str, text: str) -> Alignment:
    s_tok, t_tok = LOADERS[student_name](), LOADERS[teacher_name]()
    ids, decoded, s_spans, s_offsets = student_side(student_name, text)
    check_decoded(s_tok, ids, decoded, s_spans)
    _, t_spans = encoded_spans(t_tok, decoded)
    if not decoded and len(ids):  # only bytes the student's vocabulary cannot complete
        with pytest.raises(ValueError, match="teacher has no tokens"):
            align(0, s_spans, t_spans)
        return align(0, t_spans, t_spans)
    a = align(len(decoded), s_spans, t_spans)
    check_alignment(decoded, s_spans, t_spans, a)
    bounds = a.bounds_C1.tolist()
    check_coverage(decoded, s_spans, a.student_chunk_S, bounds)
    if represents(teacher_name, decoded):
        check_coverage(decoded, t_spans, a.teacher_chunk_T, bounds)
    # the chunk texts are what the student's tokens of each chunk decode to
    for c, chunk_text in enumerate(a.texts(decoded)):
        pieces = [decoded[s:e] for s, e in s_spans[a.student_chunk_S == c].tolist()]
        assert "".join(pieces) == chunk_text
    # the student's own offsets (a teacher's view of the same text) align the same way
    if student_name in LOSSLESS and decoded == text:
        assert (
            cut_offsets(s_offsets, len(text)).tolist() == cut_offsets(s_spans, len(text)).tolist()
        )
        b = align(len(text), s_offsets, t_spans)
        check_alignment(text, s_offsets, t_spans, b)
        assert np.array_equal(b.bounds_C1, a.bounds_C1)
    return a


@pytest.fixture(scope="module", autouse=True)
def _load_all():
    """Load the three tokenizers once before the first test (so hypothesis' timing excludes it)."""
    for load in LOADERS.values():
        load()


# --- the three tokenizers ---------------------------------------------------------------------


def test_the_tokenizers_are_the_real_ones():
    smol, gpt2, gemma = smollm2_tokenizer(), gpt2_tokenizer(), gemma3_tokenizer()
    assert len(smol) == 49_152 and len(gpt2) == 50_257 and len(gemma) == 262_144
    assert smol.convert_tokens_to_ids("<|im_start|>") is not None
    assert "<|im_start|>" in (smol.chat_template or "")
    assert gpt2("Hello world")["input_ids"] == [15496, 995]
    assert gpt2.convert_tokens_to_ids("<|endoftext|>") == 50_256
    assert gemma.convert_tokens_to_ids("<start_of_turn>") != gemma.unk_token_id
    # the caches hand back the same objects
    assert smollm2_tokenizer() is smol and gpt2_tokenizer() is gpt2 and gemma3_tokenizer() is gemma


# --- pairs of real tokenizers -------------------------------------------------------------------


@pytest.mark.parametrize("text_id", list(TEXTS))
@pytest.mark.parametrize(("student", "teacher"), PAIRS, ids=PAIR_IDS)
def test_pairs_on_hand_written_texts(student, teacher, text_id):
    run_pair(student, teacher, TEXTS[text_id])


@pytest.mark.parametrize(("student", "teacher"), PAIRS, ids=PAIR_IDS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=RANDOM_TEXT)
def test_pairs_on_random_texts(student, teacher, text):
    run_pair(student, teacher, text)


def test_cross_pairs_really_differ():
    """The cross pairs are not trivially aligned: some chunks hold several tokens of a side."""
    text = TEXTS["plain"] + TEXTS["digits"] + TEXTS["cjk"] + TEXTS["emoji"]
    for student, teacher in PAIRS[:3]:
        a = run_pair(student, teacher, text)
        assert not a.one_to_one_C.all()
        assert a.one_to_one_C.any()


# --- a tokenizer against itself ------------------------------------------------------------------


@pytest.mark.parametrize("text_id", [t for t in TEXTS if t != "empty"])
@pytest.mark.parametrize("name", list(LOADERS))
def test_identity_is_one_chunk_per_token_except_shared_characters(name, text_id):
    tok, text = LOADERS[name](), TEXTS[text_id]
    ids, spans = encoded_spans(tok, text)
    a = align(len(text), spans, spans)
    check_alignment(text, spans, spans, a)
    assert np.array_equal(a.student_chunk_S, a.teacher_chunk_T)
    # a token opens a new chunk unless it shares a character with an earlier one
    reach, starts_new = 0, []
    for i, (start, end) in enumerate(spans.tolist()):
        starts_new.append(i == 0 or (start >= reach and start > spans[i - 1, 0]))
        reach = max(reach, end)
    assert a.n_chunks == sum(starts_new)
    assert np.array_equal(a.one_to_one_C, a.student_counts_C == 1)
    if text.isascii():
        assert a.n_chunks == len(ids) and a.one_to_one_C.all()
    # the student's decoded spans of the same ids give the same chunks
    decoded, d_spans = decoded_spans(tok, ids.tolist())
    b = align(len(decoded), d_spans, spans)
    if decoded == text:
        check_alignment(text, d_spans, spans, b)
        assert np.array_equal(b.bounds_C1, a.bounds_C1)


def test_identity_gpt2_emoji_bytes_share_one_chunk():
    tok = gpt2_tokenizer()
    text = "a 👩 b"
    ids, spans = encoded_spans(tok, text)
    assert tok.convert_ids_to_tokens(ids.tolist()) == ["a", "ĠðŁĳ", "©", "Ġb"]
    assert spans.tolist() == [[0, 1], [1, 3], [2, 3], [3, 5]]  # the emoji's two byte tokens overlap
    a = align(len(text), spans, spans)
    check_alignment(text, spans, spans, a)
    assert a.texts(text) == ["a", " 👩", " b"]
    assert a.student_chunk_S.tolist() == [0, 1, 1, 2]
    assert a.one_to_one_C.tolist() == [True, False, True]
    # the same ids decoded by a student: a span of no width for the incomplete bytes
    decoded, d_spans = decoded_spans(tok, ids.tolist())
    assert decoded == text and d_spans.tolist() == [[0, 1], [1, 1], [1, 3], [3, 5]]
    b = align(len(text), d_spans, spans)
    check_alignment(text, d_spans, spans, b)
    assert b.texts(text) == ["a", " 👩", " b"]
    assert b.student_chunk_S.tolist() == [0, 1, 1, 2]


def test_identity_family_emoji_every_tokenizer():
    """👩‍👩‍👧 is five characters (three emoji, two zero-width joiners), each split over byte
    tokens in the byte-level BPEs: the tokens of a character stay in one chunk."""
    text = "👩‍👩‍👧"
    for name, load in LOADERS.items():
        tok = load()
        ids, spans = encoded_spans(tok, text)
        a = align(len(text), spans, spans)
        check_alignment(text, spans, spans, a)
        assert a.texts(text) == list(text), name
        if name in LOSSLESS:
            assert len(ids) > len(text) and not a.one_to_one_C.all()


# --- sampled, non-canonical student ids ----------------------------------------------------------


def char_by_char_ids(tok, text: str) -> list[int]:
    return [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]


def byte_level_ids(tok, text: str) -> list[int]:
    """One id per UTF-8 byte (GPT-2's byte-to-unicode map for the byte-level BPEs, <0xXX> byte
    fallback tokens for Gemma)."""
    vocab = tok.get_vocab()
    if "<0x41>" in vocab:
        return [vocab[f"<0x{b:02X}>"] for b in text.encode("utf-8")]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [vocab[table[b]] for b in text.encode("utf-8")]


NON_CANONICAL_TEXTS = [
    "internationalization",
    "Hello, world! 3.14159 12345678",
    "  two  spaces\tand\ttabs\n",
    "Ça va? déjà naïve",
    "東京 中文",
    "a 😀 👩‍👩‍👧 🇫🇷 b",
]


@pytest.mark.parametrize("text", NON_CANONICAL_TEXTS)
@pytest.mark.parametrize("how", ["char-by-char", "byte-by-byte"])
@pytest.mark.parametrize(("student", "teacher"), PAIRS, ids=PAIR_IDS)
def test_non_canonical_student_ids(student, teacher, how, text):
    s_tok, t_tok = LOADERS[student](), LOADERS[teacher]()
    ids = (char_by_char_ids if how == "char-by-char" else byte_level_ids)(s_tok, text)
    if text == "internationalization":
        assert ids != encoded_spans(s_tok, text)[0].tolist()
    decoded, spans = decoded_spans(s_tok, ids)
    assert decoded == text
    assert decoded == s_tok.decode(ids, clean_up_tokenization_spaces=False)
    check_decoded(s_tok, ids, decoded, spans)
    prefix_decodes(s_tok, ids, decoded, spans)
    if how == "byte-by-byte":
        # a byte that completes no character gets no width, the one that completes it the whole
        # character
        expected = []
        for at, ch in enumerate(text):
            n_bytes = len(ch.encode("utf-8"))
            expected += [[at, at]] * (n_bytes - 1) + [[at, at + 1]]
        assert spans.tolist() == expected
    _, t_spans = encoded_spans(t_tok, decoded)
    a = align(len(decoded), spans, t_spans)
    check_alignment(decoded, spans, t_spans, a)
    check_coverage(decoded, t_spans, a.teacher_chunk_T, a.bounds_C1.tolist())
    # the student now cuts at every character, so the chunks are exactly the teacher's cuts
    assert cut_offsets(spans, len(decoded)).tolist() == list(range(len(decoded) + 1))
    assert a.bounds_C1.tolist() == cut_offsets(t_spans, len(decoded)).tolist()


def test_split_word_tokens():
    """A word whose tokens the student sampled in pieces (" international" + "ization" spelled
    out letter by letter) decodes and aligns to the same text."""
    for name in ("smollm2", "gpt2"):
        tok = LOADERS[name]()
        canonical = tok(" internationalization", add_special_tokens=False)["input_ids"]
        head = tok(" international", add_special_tokens=False)["input_ids"]
        ids = head + [tok.convert_tokens_to_ids(ch) for ch in "ization"]
        assert ids != canonical
        decoded, spans = decoded_spans(tok, ids)
        assert decoded == " internationalization"
        assert spans[len(head) :].tolist() == [[k, k + 1] for k in range(14, 21)]
        check_decoded(tok, ids, decoded, spans)
        prefix_decodes(tok, ids, decoded, spans)
        for load_teacher in LOADERS.values():
            _, t_spans = encoded_spans(load_teacher(), decoded)
            check_alignment(decoded, spans, t_spans, align(len(decoded), spans, t_spans))


@pytest.mark.parametrize("name", list(LOADERS))
def test_completion_cut_inside_a_character(name):
    """Bytes still incomplete at the end decode as the tokenizer decodes them (U+FFFD), in the
    last id's span; the ids before it get no width."""
    tok = LOADERS[name]()
    ids = byte_level_ids(tok, "ok 😀")[:-1]  # the emoji's last byte never came
    decoded, spans = decoded_spans(tok, ids)
    if name == "gemma3":  # its decode rewrites the whole byte run: the stream's "ok " stands
        assert decoded == "ok " and spans.tolist()[-3:] == [[3, 3]] * 3
    else:
        assert decoded == tok.decode(ids) == "ok \ufffd"
        assert spans.tolist()[-3:] == [[3, 3], [3, 3], [3, 4]]
    check_decoded(tok, ids, decoded, spans)
    for load_teacher in LOADERS.values():
        _, t_spans = encoded_spans(load_teacher(), decoded)
        a = align(len(decoded), spans, t_spans)
        check_alignment(decoded, spans, t_spans, a)
        assert a.student_chunk_S[-3:].tolist() == [a.n_chunks - 1] * 3


@pytest.mark.parametrize("name", list(LOADERS))
def test_stray_continuation_byte_mid_text(name):
    """An invalid byte in the middle (a sampled continuation byte with no lead byte) decodes to
    U+FFFD as the full decode does, and the alignment still covers the text."""
    tok = LOADERS[name]()
    ids = tok("a", add_special_tokens=False)["input_ids"]
    ids += byte_level_ids(tok, "é")[1:]  # 0xA9 alone
    ids += tok("b c", add_special_tokens=False)["input_ids"]
    decoded, spans = decoded_spans(tok, ids)
    assert decoded == tok.decode(ids, clean_up_tokenization_spaces=False) == "a\ufffdb c"
    check_decoded(tok, ids, decoded, spans)
    for load_teacher in LOADERS.values():
        _, t_spans = encoded_spans(load_teacher(), decoded)
        check_alignment(decoded, spans, t_spans, align(len(decoded), spans, t_spans))


def test_gemma_invalid_byte_after_bytes_decodes():
    """Sampled ids, per decoded_spans' docstring: "é" spelled in byte-fallback tokens, a stray
    continuation byte, then "b". The full decode is '\ufffd\ufffd\ufffdb'."""
    tok = gemma3_tokenizer()
    vocab = tok.get_vocab()
    ids = [vocab["<0xC3>"], vocab["<0xA9>"], vocab["<0xA9>"], vocab["b"]]
    decoded, spans = decoded_spans(tok, ids)  # DecodeStream raises: the prefix fallback
    assert decoded == tok.decode(ids) and decoded.endswith("b")
    assert spans[-1, 1] == len(decoded) and (np.diff(spans[:, 0]) >= 0).all()


@pytest.mark.parametrize("name", list(LOADERS))
def test_special_tokens_are_kept_as_text(name):
    tok = LOADERS[name]()
    special = {"smollm2": "<|im_end|>", "gpt2": "<|endoftext|>", "gemma3": "<end_of_turn>"}[name]
    ids = tok("Hi", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(special)]
    decoded, spans = decoded_spans(tok, ids)
    assert decoded == "Hi" + special
    assert spans[-1].tolist() == [2, 2 + len(special)]


def sampled_ids(name: str):
    """Ids a student might sample: anything in the vocabulary, biased towards byte tokens (the
    ones that make incomplete characters) and common tokens."""
    size = len(LOADERS[name]())
    low = st.integers(0, 300) if name in LOSSLESS else st.integers(236_000, 262_143)
    return st.lists(st.one_of(st.integers(0, size - 1), low, st.integers(0, 3000)), max_size=24)


@pytest.mark.parametrize(("student", "teacher"), PAIRS, ids=PAIR_IDS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_sampled_ids(student, teacher, data):
    s_tok, t_tok = LOADERS[student](), LOADERS[teacher]()
    ids = data.draw(sampled_ids(student))
    decoded, spans = decoded_spans(s_tok, ids)
    check_decoded(s_tok, ids, decoded, spans)
    _, t_spans = encoded_spans(t_tok, decoded)
    if not decoded:  # nothing to compare: align refuses a student with tokens and no text
        if len(ids):
            with pytest.raises(ValueError, match="teacher has no tokens"):
                align(0, spans, t_spans)
        return
    a = align(len(decoded), spans, t_spans)
    check_alignment(decoded, spans, t_spans, a)
    if represents(teacher, decoded):
        check_coverage(decoded, t_spans, a.teacher_chunk_T, a.bounds_C1.tolist())


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_final_replacement_character_is_text(name):
    """U+FFFD is a character like any other (Gemma even has a token for it): the docstring drops
    only bytes still incomplete at the end, so "a\ufffd" should decode to itself."""
    tok = LOADERS[name]()
    ids, _ = encoded_spans(tok, "a\ufffd")
    assert tok.decode(ids.tolist()) == "a\ufffd"
    decoded, spans = decoded_spans(tok, ids.tolist())
    assert decoded == "a\ufffd"


# --- hand-made offsets against the brute-force reference ----------------------------------------


def test_hand_made_overlapping_and_zero_width_offsets():
    """GPT-2-style overlapping byte tokens against a decoded (zero-width) view of the same text
    'Hello world 👩!' (the emoji is character 12)."""
    length = 14
    teacher = np.array([[0, 5], [5, 11], [11, 13], [12, 13], [13, 14]])  # " 👩" then its last byte
    student = np.array(
        [[0, 3], [3, 5], [5, 5], [5, 11], [11, 11], [11, 12], [12, 12], [12, 13], [13, 14]]
    )
    assert sorted(reference_cuts(teacher, length)) == [0, 5, 11, 13, 14]
    assert sorted(reference_cuts(student, length)) == [0, 3, 5, 11, 12, 13, 14]
    assert cut_offsets(teacher, length).tolist() == [0, 5, 11, 13, 14]
    assert cut_offsets(student, length).tolist() == [0, 3, 5, 11, 12, 13, 14]
    a = align(length, student, teacher)
    assert a.bounds_C1.tolist() == [0, 5, 11, 13, 14]
    assert a.student_chunk_S.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 3]
    assert a.teacher_chunk_T.tolist() == [0, 1, 2, 2, 3]
    assert a.one_to_one_C.tolist() == [False, False, False, True]  # 1: a zero-width + " world"
    assert a.student_sums(np.arange(9.0)).tolist() == [1.0, 5.0, 22.0, 8.0]
    check_alignment("Hello world 👩!", student, teacher, a)


def test_hand_made_uncovered_start_is_merged():
    """Characters only one side covers at the start (the teacher's first token starts at 2)."""
    student = np.array([[0, 1], [1, 2], [2, 4], [4, 6]])
    teacher = np.array([[2, 4], [4, 6]])
    a = align(6, student, teacher)
    assert a.bounds_C1.tolist() == [0, 4, 6]
    assert a.student_chunk_S.tolist() == [0, 0, 0, 1]
    assert a.teacher_chunk_T.tolist() == [0, 1]
    check_alignment("abcdef", student, teacher, a)


def test_hand_made_edges():
    empty = np.zeros((0, 2), dtype=np.int64)
    a = align(0, empty, empty)
    assert a.bounds_C1.tolist() == [0, 0] and a.texts("") == [""]
    assert a.student_sums(np.zeros(0)).tolist() == [0.0]
    with pytest.raises(ValueError, match="teacher"):
        align(3, np.array([[0, 3]]), empty)
    with pytest.raises(ValueError, match="student"):
        align(3, empty, np.array([[0, 3]]))
    # zero-width tokens at the very end (incomplete bytes) join the last chunk
    a = align(2, np.array([[0, 1], [1, 2], [2, 2], [2, 2]]), np.array([[0, 2]]))
    assert a.bounds_C1.tolist() == [0, 2] and a.student_chunk_S.tolist() == [0, 0, 0, 0]


@st.composite
def synthetic_tokenization(draw, length: int):
    """A tokenization of a `length`-character text in the styles real tokenizers produce: whole
    tokens over one or more characters, a character split into byte tokens that overlap (GPT-2
    offsets, the first possibly also covering characters before it), or bytes of no width then
    the completing token (decoded spans)."""
    spans: list[list[int]] = []
    p = 0
    while p < length:
        style = draw(st.sampled_from(["whole", "whole", "overlap", "zero-width"]))
        if style == "whole":
            k = draw(st.integers(1, min(4, length - p)))
            spans.append([p, p + k])
            p += k
            continue
        k = draw(st.integers(0, min(2, length - p - 1)))  # characters before the split one
        n = draw(st.integers(2, 4))  # byte tokens of the split character
        end = p + k + 1
        if style == "overlap":
            spans += [[p, end]] + [[end - 1, end]] * (n - 1)
        else:
            spans += [[p, p]] * (n - 1) + [[p, end]]
        p = end
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


@settings(max_examples=EXAMPLES * 8, deadline=None)
@given(data=st.data())
def test_synthetic_offsets_against_brute_force(data):
    length = data.draw(st.integers(0, 16))
    student = data.draw(synthetic_tokenization(length))
    teacher = data.draw(synthetic_tokenization(length))
    blind = data.draw(st.booleans()) and length > 2
    if blind:  # a teacher blind to the first characters
        skip = data.draw(st.integers(1, length - 1))
        kept = teacher[teacher[:, 0] >= skip]
        blind = len(kept) > 0 and kept[0, 0] > 0
        teacher = kept if len(kept) else teacher
    a = align(length, student, teacher)
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    check_alignment(text, student, teacher, a)
    bounds = a.bounds_C1.tolist()
    # with every character covered on both sides nothing is merged: the chunks are exactly the
    # spans between consecutive common cut points
    if not blind and length:
        common = reference_cuts(student, length) & reference_cuts(teacher, length)
        assert bounds == sorted(common)


def test_a_byte_run_the_stream_gave_text_for_then_gave_up_on():
    """Gemma's <0x00> streams as a NUL, then <0x80> makes the run invalid: the whole text is
    rewritten to U+FFFD and the stream raises. The spans come from decoding prefixes and still
    cover the tokenizer's own decoding (a case hypothesis found)."""
    tok, ids = LOADERS["gemma3"](), [238, 366, 0]
    decoded, spans = decoded_spans(tok, ids)
    assert decoded == tok.decode(ids, skip_special_tokens=False)
    check_decoded(tok, ids, decoded, spans)
    check_alignment(
        decoded,
        spans,
        encoded_spans(tok, decoded)[1],
        align(len(decoded), spans, encoded_spans(tok, decoded)[1]),
    )
