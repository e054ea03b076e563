"""`opd select-prompts`: rank a prompt pool by alignment with the teacher, dedupe it, mix in OOD.

    opd select-prompts --pool pool.jsonl --teacher-url http://127.0.0.1:8000 \\
        --tokenizer /models/teacher --count 2000 --out selected.jsonl
    opd select-prompts --pool pool.jsonl --teacher-url http://127.0.0.1:8000 \\
        --student runs/student --count 2000 --ood other.jsonl --ood-fraction 0.2 \\
        --dedupe-against eval.jsonl --out selected.parquet

This is the method's "teacher-aligned prompts" recovery step (docs/recipes.md, `## opd
select-prompts`). Scores per prompt:
    teacher_logprob   mean teacher log-prob per token of the prompt's own (content) tokens,
                      rendered as a user turn in the chat template, the template's tokens as
                      context. Prompts like the teacher's post-training data score higher.
    student_overlap   (with --student) mean top-k overlap ratio |S(p) & S(q)| / k over the
                      positions of short student rollouts, scored by the teacher
                      (opd.client.train.diagnostics, "overlap/ratio").
    combined          mean of the available scores' percentile ranks in the pool.

Steps: load -> exact dedupe -> tokenizer, teacher connect, length filter -> embeddings and
near-dedupe against the other sets -> score -> rank -> near-dedupe within the pool in rank order
-> mix in OOD -> write the set, `<stem>.removed.jsonl` and `<stem>.summary.json`.
The pure parts (dedupe, percentiles, mixing, writing) are in opd.client.recipes.prompt_selection.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import typer

from opd.client.configs.select import SelectConfig
from opd.client.recipes import prompt_selection as ps
from opd.client.recipes.prompt_embeddings import DEFAULT_THRESHOLDS, make_embedder
from opd.client.teacher.client import TeacherClient
from opd.client.train.bridge import ScoreSpec
from opd.client.train.prompts import load_prompts
from opd.shared.config_cli import replayable
from opd.shared.packed import PackedRequest
from opd.shared.schemas import ScoreOptions

if TYPE_CHECKING:
    from opd.client.train.factory import Student
    from opd.client.train.pipeline import Connected

# Prompts per teacher request of the likelihood, and per chunk of student rollouts.
_CHUNK = 64
_ROLLOUT_CHUNK = 32


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@dataclass
class EncodedPrompts:
    """Prompts rendered as chat user turns: token ids and the [start, end) of their content."""

    ids: list[list[int]]
    spans: list[tuple[int, int]]

    @staticmethod
    def render(tokenizer: Any, texts: Sequence[str]) -> EncodedPrompts:
        from opd.client.train.student import chat_prompt_ids

        empty = chat_prompt_ids(tokenizer, "")
        ids = [chat_prompt_ids(tokenizer, t) for t in texts]
        return EncodedPrompts(ids, [ps.content_span(seq, empty) for seq in ids])

    def take(self, positions: Sequence[int]) -> EncodedPrompts:
        return EncodedPrompts([self.ids[p] for p in positions], [self.spans[p] for p in positions])


def teacher_likelihood(client: TeacherClient, enc: EncodedPrompts) -> np.ndarray:
    """Mean teacher log-prob per content token, per prompt ([n]; nan without a scorable token).

    The whole rendered prompt is scored with the template's prefix as context
    (score_from = start, at least 1 as the protocol requires); row i of a result is token
    score_from + i, so the content tokens are its first end - score_from rows."""
    out_n = np.full(len(enc.ids), np.nan)
    scorable = [i for i, seq in enumerate(enc.ids) if len(seq) >= 2]  # 1 <= score_from <= L - 1
    for a in range(0, len(scorable), _CHUNK):
        chunk = scorable[a : a + _CHUNK]
        ids = [enc.ids[i] for i in chunk]
        score_from = [min(max(enc.spans[i][0], 1), len(enc.ids[i]) - 1) for i in chunk]
        result = client.score(PackedRequest.from_arrays(ids, score_from, options=ScoreOptions()))
        for i, scores, sf in zip(chunk, result.sequences(), score_from, strict=True):
            end = enc.spans[i][1]
            content = np.asarray(scores.token_logprobs[: max(end - sf, 0)], dtype=np.float64)
            if content.size:
                out_n[i] = float(content.mean())
    return out_n


def student_overlap(
    built: Student, teachers: Connected, enc: EncodedPrompts, cfg: SelectConfig
) -> np.ndarray:
    """Mean top-k overlap ratio of `--rollouts` short student rollouts per prompt ([n]).

    The ratio is the diagnostics' "overlap/ratio" (|S_t(p) & S_t(q)| / k, mean over the
    prompt's completion positions), computed by opd.client.train.diagnostics on the same arrays
    `opd train` logs. The teacher scores chunk c while the student samples chunk c + 1
    (opd.client.train.pipeline)."""
    from opd.client.train.diagnostics import compute_diagnostics
    from opd.client.train.pipeline import collect
    from opd.client.train.positions import PositionStats
    from opd.client.train.rollouts import chunk_sampler

    params = built.sampling(cfg.sampling)
    spec = ScoreSpec(top_k=cfg.top_k, candidates=True, entropy=True)
    chunks = [
        list(range(a, min(a + _ROLLOUT_CHUNK, len(enc.ids))))
        for a in range(0, len(enc.ids), _ROLLOUT_CHUNK)
    ]

    sample = chunk_sampler(built.engine, built.module, lambda i: enc.ids[i], params, cfg.top_k)
    (teacher,) = teachers.teachers
    scored = collect(teachers.teachers, chunks, sample, spec).scored[teacher.name]
    out_n = np.full(len(enc.ids), np.nan)
    by_prompt: dict[int, list] = {}
    for r in scored:
        by_prompt.setdefault(r.prompt_index, []).append(r)
    for i, mine in by_prompt.items():
        stats = PositionStats.from_rollouts(mine)
        out_n[i] = compute_diagnostics(stats, depth_bucket=None)["overlap/ratio"]
    return out_n


class Scorer:
    """The teacher (and optional student) behind the scores; loads and connects once."""

    def __init__(self, cfg: SelectConfig) -> None:
        from transformers import AutoTokenizer

        from opd.shared.fingerprint import fingerprint_hf_tokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fetch nothing
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path())
        fingerprint = fingerprint_hf_tokenizer(self.tokenizer)
        if cfg.connection.cross_tokenizer != "off":
            raise ps.SelectionError(
                "cross_tokenizer: opd select-prompts scores prompts as the student's token ids, "
                "so its teacher must share the student's tokenizer (leave --cross-tokenizer off)"
            )
        if cfg.student and cfg.tokenizer:
            student_tok = AutoTokenizer.from_pretrained(cfg.student)
            if fingerprint_hf_tokenizer(student_tok) != fingerprint:
                raise ps.SelectionError(
                    f"--tokenizer {cfg.tokenizer} differs from the student's tokenizer; leave "
                    "it out (the student's is the default)"
                )
        # connect (protocol and tokenizer fingerprint checks) before loading a student
        self.client = TeacherClient(
            cfg.teacher_url, api_key=cfg.connection.api_key, tokenizer_fingerprint=fingerprint
        )
        try:
            self.info = self.client.connect()
        except BaseException:
            self.client.close()
            raise
        self.student: Student | None = None
        self.teachers: Connected | None = None
        if cfg.student:
            from opd.client.train.factory import build_student, connect

            self.student = build_student(cfg.student, cfg.student_options, seed=cfg.seed)
            self.teachers = connect(
                [(None, cfg.teacher_url)],
                cfg.connection,
                ScoreSpec(top_k=cfg.top_k, candidates=True, entropy=True),
                cfg.top_k,
                fingerprint=fingerprint,
            )

    def max_prompt_tokens(self) -> int:
        """The longest rendered prompt that can be scored (and continued by rollouts)."""
        limit = self.info.limits.max_tokens_per_sequence
        if self.student is not None:
            limit -= self.cfg.sampling.max_tokens
        if self.cfg.max_prompt_tokens is not None:
            limit = min(limit, self.cfg.max_prompt_tokens)
        return limit

    def encode(self, texts: Sequence[str]) -> EncodedPrompts:
        return EncodedPrompts.render(self.tokenizer, texts)

    def scores(self, enc: EncodedPrompts) -> dict[str, np.ndarray]:
        out = {"teacher_logprob": teacher_likelihood(self.client, enc)}
        if self.student is not None:
            import torch

            assert self.teachers is not None
            torch.manual_seed(self.cfg.seed)
            out["student_overlap"] = student_overlap(self.student, self.teachers, enc, self.cfg)
        return out

    def close(self) -> None:
        self.client.close()
        if self.teachers is not None:
            self.teachers.close()
        if self.student is not None:
            self.student.close()


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------

_KEY_COLUMN = {"likelihood": "teacher_logprob", "overlap": "student_overlap"}
_SCORE_COLUMNS = ("teacher_logprob", "student_overlap", "combined")


def _length_filter(
    texts: ps.TextSet, enc: EncodedPrompts, limit: int
) -> tuple[list[int], list[ps.Removed]]:
    keep, removed = [], []
    for pos, ids in enumerate(enc.ids):
        if len(ids) > limit:
            removed.append(
                ps.Removed(
                    texts.texts[pos], texts.name, texts.indices[pos], "too_long", tokens=len(ids)
                )
            )
        else:
            keep.append(pos)
    return keep, removed


def _count(removed: Sequence[ps.Removed], set_name: str, reason: str, within: bool | None = None):
    return sum(
        1
        for r in removed
        if r.set == set_name
        and r.reason == reason
        and (within is None or (r.matched_set == set_name) == within)
    )


def _embed(embedder: Any, groups: Sequence[ps.TextSet]) -> list[np.ndarray]:
    """Embeddings of every set, from one encode call (the lexical IDF is fit on all of them)."""
    emb_all = embedder.encode([t for g in groups for t in g.texts])
    bounds = np.cumsum([0, *(len(g.texts) for g in groups)])
    return [emb_all[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _row(
    source: str, origin: str, texts: ps.TextSet, pos: int, scores: dict, rank: int | None
) -> dict[str, Any]:
    """One output row (columns: prompt_selection.OUTPUT_COLUMNS)."""
    return {
        "prompt": texts.texts[pos],
        "source": source,
        "origin": origin,
        "index": texts.indices[pos],
        "rank": rank,
        **{k: float(scores[k][pos]) if k in scores else None for k in _SCORE_COLUMNS},
    }


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def run_selection(
    cfg: SelectConfig,
    log: Callable[[str], None] = lambda _: None,
    scorer_factory: Callable[[SelectConfig], Scorer] = Scorer,
) -> dict[str, Any]:
    """Select, write the three files, and return the summary (also in `<stem>.summary.json`)."""
    rank_by = cfg.resolved_rank_by()
    cfg.tokenizer_path()
    ps.ood_count(cfg.count or 1, cfg.ood_fraction)  # checks the fraction up front
    if Path(cfg.out).suffix.lower() not in (".jsonl", ".parquet"):
        raise ps.SelectionError(f"--out must end in .jsonl or .parquet, got {cfg.out!r}")
    rng = np.random.default_rng(cfg.seed)

    # --- load and exact dedupe (cheap; before anything is scored)
    pool_all = ps.TextSet.of("pool", load_prompts(cfg.pool, cfg.prompt_field))
    others = [ps.TextSet.of(p, load_prompts(p, cfg.prompt_field)) for p in cfg.dedupe_against]
    keep, removed = ps.exact_dedupe(pool_all, others)
    pool = pool_all.take(keep)
    ood_all = ps.TextSet.of("ood", load_prompts(cfg.ood, cfg.prompt_field)) if cfg.ood else None
    ood = None
    if ood_all is not None and cfg.ood_fraction > 0:
        keep, gone = ps.exact_dedupe(ood_all, [*others, pool_all])
        ood, removed = ood_all.take(keep), removed + gone
    log(f"pool {len(pool_all.texts)} prompts, {len(pool.texts)} after exact dedupe")

    scorer = scorer_factory(cfg)
    try:
        # --- length filter: prompts the teacher (and rollouts) cannot take, counted
        limit = scorer.max_prompt_tokens()
        if limit < 2:
            raise ps.SelectionError(f"no room for a prompt: the token limit works out to {limit}")
        enc = scorer.encode(pool.texts)
        keep, gone = _length_filter(pool, enc, limit)
        pool, enc, removed = pool.take(keep), enc.take(keep), removed + gone
        if gone:
            log(f"skipped {len(gone)} pool prompts longer than {limit} tokens")
        if ood is not None:
            keep, gone = _length_filter(ood, scorer.encode(ood.texts), limit)
            ood, removed = ood.take(keep), removed + gone

        # --- embeddings of every set in one call; near dedupe against the other sets
        embedder = make_embedder(cfg.embedder, cfg.student_options.device)
        threshold = (
            cfg.near_dup_threshold
            if cfg.near_dup_threshold is not None
            else DEFAULT_THRESHOLDS[embedder.name]
        )
        embs = _embed(embedder, [pool, *others, *([ood] if ood is not None else [])])
        pool_emb, other_embs = embs[0], embs[1 : 1 + len(others)]
        keep, gone = ps.near_dedupe_against(
            pool, pool_emb, list(zip(others, other_embs, strict=True)), threshold
        )
        pool, enc, pool_emb, removed = (
            pool.take(keep),
            enc.take(keep),
            pool_emb[keep],
            removed + gone,
        )
        log(
            f"{len(pool.texts)} pool prompts left after dedupe against other sets ({embedder.name})"
        )
        ood_order: list[int] | None = None
        if ood is not None:
            ood_emb = embs[-1]
            refs = [*zip(others, other_embs, strict=True), (pool, pool_emb)]
            keep, gone = ps.near_dedupe_against(ood, ood_emb, refs, threshold)
            ood, ood_emb, removed = ood.take(keep), ood_emb[keep], removed + gone
            # random (seeded) order, then keep an OOD prompt unless it near-duplicates one before
            shuffled = [int(i) for i in rng.permutation(len(ood.texts))]
            ood_order, gone = ps.near_dedupe_greedy(ood, ood_emb, shuffled, threshold)
            removed += gone
        n_ood = ps.ood_count(cfg.count, cfg.ood_fraction) if cfg.count else 0
        needed = (cfg.count or 0) - (n_ood if ood is not None else 0)
        if len(pool.texts) < needed:
            raise ps.SelectionError(
                f"asked for {needed} pool prompts but only {len(pool.texts)} are left after "
                f"dedupe and length filtering (of {len(pool_all.texts)})"
            )

        # --- score and rank the pool
        log(f"scoring {len(pool.texts)} prompts on the teacher {scorer.info.name}")
        scores = scorer.scores(enc)
        pct = {k: ps.percentile_ranks(v) for k, v in scores.items()}
        scores["combined"] = ps.combine_percentiles(list(pct.values()))
        key = scores[_KEY_COLUMN.get(rank_by, "combined")]
        order = [int(i) for i in ps.rank_order(key)]

        # --- near dedupe within the pool: the better-ranked prompt stays
        ranked, gone = ps.near_dedupe_greedy(pool, pool_emb, order, threshold)
        removed += gone
        if not ranked:
            raise ps.SelectionError("no pool prompts are left after dedupe and length filtering")
        # without --count: as many prompts as the deduplicated pool holds
        count = cfg.count or len(ranked)
        n_ood = ps.ood_count(count, cfg.ood_fraction)
        selection = ps.mix(ranked, count, n_ood, rng, ood_order)

        # --- rows; rank = position in the deduped ranking
        rank = {pos: r for r, pos in enumerate(ranked, 1)}
        rows = [_row("aligned", "pool", pool, p, scores, rank[p]) for p in selection.aligned]
        if selection.ood_from_pool:
            rows += [_row("ood", "pool", pool, p, scores, rank[p]) for p in selection.ood]
        elif selection.ood:
            # scored too, and placed on the pool's percentile scale
            picked = ood.take(selection.ood)
            ood_scores = scorer.scores(scorer.encode(picked.texts))
            ood_pct = [ps.percentile_ranks(v, scores[k]) for k, v in ood_scores.items()]
            ood_scores["combined"] = ps.combine_percentiles(ood_pct)
            rows += [
                _row("ood", "ood-file", picked, j, ood_scores, None)
                for j in range(len(picked.texts))
            ]
        teacher = {"name": scorer.info.name, "revision": scorer.info.revision}
    finally:
        scorer.close()

    if cfg.teacher_name is not None:  # one set per teacher, concatenated, routes in opd train
        rows = [{**row, cfg.teacher_field: cfg.teacher_name} for row in rows]
    out = ps.write_rows(cfg.out, rows)
    removed_path = ps.write_removed(ps.side_path(out, "removed.jsonl"), removed)
    summary = {
        "out": str(out),
        "removed_file": str(removed_path),
        "counts": {
            "pool": len(pool_all.texts),
            "pool_exact_dupes_within": _count(removed, "pool", "exact", within=True),
            "pool_exact_dupes_against": _count(removed, "pool", "exact", within=False),
            "pool_near_dupes_within": _count(removed, "pool", "near", within=True),
            "pool_near_dupes_against": _count(removed, "pool", "near", within=False),
            "pool_too_long": _count(removed, "pool", "too_long"),
            "pool_ranked": len(order),
            "pool_after_dedupe": len(ranked),
            "ood_file": len(ood_all.texts) if ood_all is not None else None,
            "ood_exact_dupes": _count(removed, "ood", "exact"),
            "ood_near_dupes": _count(removed, "ood", "near"),
            "ood_too_long": _count(removed, "ood", "too_long"),
            "selected_aligned": len(selection.aligned),
            "selected_ood": len(selection.ood),
        },
        "ood_source": None if not n_ood else "pool" if selection.ood_from_pool else "ood-file",
        "rank_by": rank_by,
        "embedder": embedder.name,
        "near_dup_threshold": threshold,
        "max_prompt_tokens": limit,
        "teacher": teacher,
        "settings": replayable(cfg),
        "score_means": {
            source: {
                k: _mean([r[k] for r in rows if r["source"] == source]) for k in _SCORE_COLUMNS
            }
            for source in ("aligned", "ood")
        },
    }
    summary["summary_file"] = str(ps.side_path(out, "summary.json"))
    ps.write_summary(summary["summary_file"], summary)
    return summary


# --------------------------------------------------------------------------------------------
# The command (registered by client/cli.py as `opd select-prompts`)
# --------------------------------------------------------------------------------------------


def run_select_prompts(cfg: SelectConfig) -> None:
    """Rank a prompt pool by alignment with the teacher, dedupe it against other sets, mix in
    out-of-distribution prompts, and write the selected set with its scores. The teacher API
    key comes from OPD_API_KEY."""
    from pydantic import ValidationError
    from rich.console import Console

    from opd.client.teacher.errors import OPDClientError

    console = Console(stderr=True, soft_wrap=True)
    try:
        summary = run_selection(cfg, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    except (ValidationError, ValueError, FileNotFoundError, OPDClientError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    c = summary["counts"]
    ood_from = f" from the {summary['ood_source']}" if summary["ood_source"] else ""
    console.print(
        f"selected {c['selected_aligned']} aligned + {c['selected_ood']} OOD{ood_from} "
        f"of {c['pool']} pool prompts; removed {c['pool_exact_dupes_within']} + "
        f"{c['pool_exact_dupes_against']} exact and {c['pool_near_dupes_within']} + "
        f"{c['pool_near_dupes_against']} near duplicates (within the pool + against other sets; "
        f"{summary['embedder']}, cosine >= {summary['near_dup_threshold']}) and "
        f"{c['pool_too_long']} prompts over {summary['max_prompt_tokens']} tokens"
    )
    console.print(f"wrote {summary['out']}, {summary['removed_file']}, {summary['summary_file']}")
