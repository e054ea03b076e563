"""The replication over several seeds (`--seeds 0,1,2`): every figure's spread, and verdicts that
read the spread rather than one run.

Why: a seed does not pin CPU numerics across machines. Seed 0 on two machines of the same kind
gave the same five verdicts but other figures (the untrained student 0.754 vs 0.793, gap
recovery 0.62 vs 0.87), so one run's figure is one draw, and a verdict that rests on one draw
can flip on the next machine.

What: each seed is a whole replication, exactly as a single run (`run_replicate` with that seed,
into OUT/seed{S}/, with its own data split, models, runs and tables). A seed whose
OUT/seed{S}/results.json was written from the same plan (and the same tiny flag and results
version) is reused, not rerun. Then OUT/replication.md and OUT/results.json over the seeds:
every figure of the single-seed tables, by the same code (tables.Finding: one function computes
a finding's figures, and its table is written once against a view), printed as its mean over the
seeds, its min-max range and its sample standard deviation: `0.771 (0.754–0.793, sd 0.020)`.

The verdict over seeds (SPREAD_RULE, stated under every table):
- *inconclusive* when any seed could not test the claim: the finding was then not tested over
  these seeds, and reading the other seeds alone would choose the seeds after the fact;
- *reproduces* when the single-seed rule says "reproduces" in every seed, and every comparison
  that rule rests on ("OPD from teacher-x ends above the student", ...; tables.Comparison) holds
  beyond the spread: the difference of the two figures' means exceeds the larger of their
  min-max ranges over the seeds;
- *partly reproduces* when the rule holds at least partly in most seeds (more than half), or
  in every seed but not beyond the spread;
- *does not reproduce* otherwise (a finding that holds in a minority of seeds is what noise
  alone gives).

Why this margin: the single-seed rule already demands, in every seed, that the two accuracies'
95% intervals are apart, which covers the eval set's sampling noise; what it cannot see is how
much the whole pipeline (data split, models, OPD) moves between seeds. The min-max range is that
movement as the table prints it, so a reader checks the rule from the printed cells. The range
is used rather than an interval built from the sd because with 3 seeds an sd is itself
uncertain by about half its value (1 / sqrt(2 (n - 1))). For three normal draws the expected
range is about 1.7 sd, so the margin asks for a difference of about 1.7 sd of the more variable
figure: a plain rule a reader can check, not a significance test (the per-seed 95% intervals
carry the statistics). The figures are compared unpaired, which is conservative: seeds that
move both figures together only make the real margin larger.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from experiments.replication.run import REPLICATE_VERSION, ReplicateConfig, plan_for, run_replicate
from experiments.replication.tables import (
    FINDINGS,
    INCONCLUSIVE,
    NOT,
    PARTLY,
    REPRODUCES,
    Comparison,
    Figure,
    Figures,
    Finding,
    model_figures,
    models_table,
)

SPREAD_RULE = (
    "Across seeds: reproduces when the rule says reproduces in every seed and every comparison "
    "it rests on holds beyond the spread (the difference of the two figures' means exceeds the "
    "larger of their min–max ranges); partly when the rule holds at least partly in most "
    "seeds, or in every seed but not beyond the spread; does not reproduce otherwise; "
    "inconclusive when any seed could not test the claim."
)


@dataclass(frozen=True)
class Spread:
    """A number's mean, range and sample sd over the seeds that measured it."""

    mean: float
    lo: float
    hi: float
    sd: float | None  # None with one value

    @property
    def range(self) -> float:
        return self.hi - self.lo


def spread(values: Sequence[float]) -> Spread:
    """The spread of a figure's finite values (at least one)."""
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Spread(statistics.fmean(values), min(values), max(values), sd)


def _numbers(figures: Sequence[Figure | None]) -> list[float] | None:
    """The figure's number in every seed, or None when a seed lacks it (or it is a category)."""
    out = []
    for fig in figures:
        if fig is None or fig.missing() or isinstance(fig.value, str):
            return None
        out.append(float(fig.value))  # type: ignore[arg-type]
    return out


def spread_text(figures: Sequence[Figure | None], seeds: Sequence[int]) -> str:
    """One cell over the seeds: `mean (min–max, sd s)` in the figure's own format, a category's
    counts (`good ×2, borderline ×1`), and the seeds that did not measure it."""
    present = [(s, f) for s, f in zip(seeds, figures, strict=True) if f and not f.missing()]
    absent = [str(s) for s, f in zip(seeds, figures, strict=True) if not f or f.missing()]
    if not present:
        return "n/a"
    template = present[0][1]
    if any(isinstance(f.value, str) for _, f in present):
        counts = Counter(str(f.value) for _, f in present)
        text, note = ", ".join(f"{k} ×{n}" for k, n in counts.items()), ""
    elif len(present) == 1:
        text, note = template.number(float(present[0][1].value)), f"seed {present[0][0]} only"  # type: ignore[arg-type]
    else:
        s = spread([float(f.value) for _, f in present])  # type: ignore[arg-type]
        text = template.number(s.mean)
        if template.number(s.lo) == template.number(s.hi):
            note = "every seed"  # a figure the seeds do not move (a teacher at 1.000)
        else:
            lo, hi = template.number(s.lo), template.number(s.hi)
            note = f"{lo}–{hi}, sd {s.sd:.{template.digits}f}"
    if absent and len(present) > 1:
        note += ("; " if note else "") + f"n/a in seed {', '.join(absent)}"
    return f"{text} ({note})" if note else text


class SpreadView:
    """The figures of every seed, printed as their spread (tables.View)."""

    ci_note = ""

    def __init__(self, per_seed: Sequence[Figures], seeds: Sequence[int]) -> None:
        self.per_seed, self.seeds = list(per_seed), list(seeds)

    def figures(self, key: str) -> list[Figure | None]:
        return [figs.get(key) for figs in self.per_seed]

    def __call__(self, key: str, ci: bool = False) -> str:
        return spread_text(self.figures(key), self.seeds)

    def names(self) -> Sequence[str]:
        return list(dict.fromkeys(k for figs in self.per_seed for k in figs))

    def missing(self, key: str) -> bool:
        return all(f is None or f.missing() for f in self.figures(key))

    def summary(self) -> dict[str, Any]:
        """Every figure's values by seed and its spread, for results.json."""
        out: dict[str, Any] = {}
        for key in self.names():
            figs = self.figures(key)
            values = [None if f is None or f.missing() else f.value for f in figs]
            entry: dict[str, Any] = {"values": values}
            numbers = [float(v) for v in values if isinstance(v, int | float)]
            if numbers and len(numbers) == sum(v is not None for v in values):
                s = spread(numbers)
                entry.update(mean=s.mean, min=s.lo, max=s.hi, sd=s.sd)
            out[key] = entry
        return out


def beyond_spread(view: SpreadView, comparison: Comparison) -> dict[str, Any]:
    """Whether `above` exceeds `below` by more than either figure's min-max range over the
    seeds (unmeasured in a seed: it does not hold)."""
    a, b = _numbers(view.figures(comparison.above)), _numbers(view.figures(comparison.below))
    if a is None or b is None:
        return {"comparison": comparison.words, "difference": None, "spread": None, "holds": False}
    sa, sb = spread(a), spread(b)
    difference, margin = sa.mean - sb.mean, max(sa.range, sb.range)
    return {
        "comparison": comparison.words,
        "difference": difference,
        "spread": margin,
        "holds": difference > margin,
    }


def across_seeds(verdicts: Sequence[str], beyond: bool) -> str:
    """SPREAD_RULE: the verdict over seeds from each seed's verdict and whether every
    comparison the finding rests on held beyond the spread."""
    if INCONCLUSIVE in verdicts:
        return INCONCLUSIVE
    if all(v == REPRODUCES for v in verdicts):
        return REPRODUCES if beyond else PARTLY
    held = sum(v in (REPRODUCES, PARTLY) for v in verdicts)
    return PARTLY if held > len(verdicts) / 2 else NOT


def judge(finding: Finding, by_seed: Mapping[int, dict]) -> dict[str, Any]:
    """One finding over the seeds: its section of replication.md, the verdicts, the figures."""
    seeds = list(by_seed)
    per_seed = [finding.figures(by_seed[s]) for s in seeds]
    verdicts = {s: finding.verdict(figs) for s, figs in zip(seeds, per_seed, strict=True)}
    view = SpreadView(per_seed, seeds)
    checks = [beyond_spread(view, c) for c in finding.comparisons(view.names())]
    verdict = across_seeds(list(verdicts.values()), all(c["holds"] for c in checks))

    def said(check: dict[str, Any]) -> str:
        if check["difference"] is None:
            return f"{check['comparison']}: not measured in every seed"
        held = "holds" if check["holds"] else "does not hold"
        return (
            f"{check['comparison']}: {check['difference']:.3f} apart, spread "
            f"{check['spread']:.3f} ({held})"
        )

    rule = "\n\n".join([
        f"Rule in each seed: {finding.rule(view)}",
        SPREAD_RULE,
        " ".join([
            "Per seed: " + ", ".join(f"seed {s} {v}" for s, v in verdicts.items()) + ".",
            *(["Beyond the spread: " + "; ".join(map(said, checks)) + "."] if checks else []),
        ]),
    ])  # fmt: skip
    return {
        "text": finding.section(view, rule, verdict),
        "verdict": verdict,
        "per_seed": verdicts,
        "comparisons": checks,
        "figures": view.summary(),
    }


def seed_tables(by_seed: Mapping[int, dict], reused: Mapping[int, bool]) -> tuple[str, dict]:
    """replication.md over the seeds, and its results.json: the verdicts side by side, the
    models' accuracies and the six tables with every figure's spread."""
    seeds = list(by_seed)
    judged = {finding.name: judge(finding, by_seed) for finding in FINDINGS}
    tiny = any(r.get("tiny") for r in by_seed.values())
    names = ", ".join(map(str, seeds))
    total = sum(r.get("timing", {}).get("total_s") or 0.0 for r in by_seed.values())
    verdict_rows = [
        f"| finding | {' | '.join(f'seed {s}' for s in seeds)} | across seeds |",
        "|---|" + "---|" * (len(seeds) + 1),
        *(
            f"| {f.title} | {' | '.join(judged[f.name]['per_seed'][s] for s in seeds)} | "
            f"**{judged[f.name]['verdict']}** |"
            for f in FINDINGS
        ),
    ]
    models = SpreadView([model_figures(by_seed[s]) for s in seeds], seeds)
    head = [
        f"# Replication over seeds {names}"
        + (" (tiny mode: the numbers mean nothing)" if tiny else ""),
        "",
        f"Each seed is a whole replication in OUT/seed{{S}}/ (its own data split, models, runs "
        f"and replication.md); {total:.0f} s of stages over the {len(seeds)} seeds. Every "
        "cell is a figure of the single-seed tables as its mean over the seeds (min–max, "
        "sample sd); each verdict follows the rule under its table.",
        "",
        *verdict_rows,
        "",
        *models_table(by_seed[seeds[0]]["plan"], models),
        "",
    ]
    text = "\n".join(head + [judged[f.name]["text"] + "\n" for f in FINDINGS])
    summary = {
        "version": REPLICATE_VERSION,
        "tiny": tiny,
        "seeds": seeds,
        "per_seed": {
            str(s): {
                "dir": f"seed{s}",
                "reused": reused.get(s, False),
                "total_s": by_seed[s].get("timing", {}).get("total_s"),
                "verdicts": {name: j["per_seed"][s] for name, j in judged.items()},
            }
            for s in seeds
        },
        "verdicts": {name: j["verdict"] for name, j in judged.items()},
        "comparisons": {name: j["comparisons"] for name, j in judged.items()},
        "figures": {
            "models": models.summary(),
            **{name: j["figures"] for name, j in judged.items()},
        },
    }
    return text, summary


def seed_config(config: ReplicateConfig, seed: int) -> ReplicateConfig:
    """The single-seed replication of one of `config`'s seeds, into OUT/seed{S}/."""
    return ReplicateConfig(
        out_dir=str(Path(config.out_dir) / f"seed{seed}"),
        tiny=config.tiny,
        seed=seed,
        reuse_models=config.reuse_models,
    )


def finished(one: ReplicateConfig) -> tuple[dict | None, str]:
    """The results.json of a finished single-seed run of the same plan (None when there is
    none, or it came from another plan, tiny flag or results version), and why."""
    from opd.client.train.metric_log import finite_json

    path = Path(one.out_dir) / "results.json"
    if not path.exists():
        return None, "no results.json yet"
    saved = json.loads(path.read_text())
    # the plan as results.json writes it: tuples as lists, nan as null
    plan = json.loads(json.dumps(finite_json(asdict(plan_for(one)))))
    if saved.get("plan") != plan or saved.get("tiny") != one.tiny or saved.get("seed") != one.seed:
        return None, "its results.json is from another plan"
    if saved.get("version") != REPLICATE_VERSION:
        return None, f"its results.json is of version {saved.get('version')}"
    return saved, "results.json from the same plan"


def run_seeds(config: ReplicateConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every seed of `config.seeds` (run, or reused when finished with the same plan), then
    OUT/replication.md and OUT/results.json over the seeds."""
    from opd.client.train.metric_log import finite_json

    out = Path(config.out_dir)
    by_seed: dict[int, dict] = {}
    reused: dict[int, bool] = {}
    for seed in config.seed_list:
        one = seed_config(config, seed)
        saved, why = finished(one)
        reused[seed] = saved is not None
        if saved is not None:
            log(f"seed {seed}: reusing {one.out_dir} ({why}), not rerunning it")
        else:
            log(f"seed {seed}: running the replication into {one.out_dir} ({why})")
            run_replicate(one, log)
            saved = json.loads((Path(one.out_dir) / "results.json").read_text())
        by_seed[seed] = saved
    text, summary = seed_tables(by_seed, reused)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replication.md").write_text(text)
    (out / "results.json").write_text(json.dumps(finite_json(summary), indent=1))
    log(f"wrote {out / 'replication.md'} over seeds {', '.join(map(str, by_seed))}")
    return summary
