"""`opd probe --domain-field COLUMN`: teachers ranked per domain, and a routing for `opd train`.

Why: with several specialist teachers, the question is not "which teacher is best" but "which
teacher for which prompts". The method's conditions hold per pair and per data: a math teacher
can be compatible on math and incompatible on code. The probe already scores every teacher on
the same student rollouts; this splits those rollouts by the prompts' domain column, gives each
(domain, teacher) the same diagnostics and verdict as the overall ranking, and suggests
`--teacher-field COLUMN --route DOMAIN=TEACHER` flags: per domain, the best-ranked teacher. A
domain whose best teacher is still incompatible or has no signal is reported as such, with
the repairs (cold start, prompt selection), rather than routed silently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opd.client.train.positions import PositionStats
from opd.client.train.rollouts import Rollout

# Verdict classes a suggested route should not rely on.
_UNFIT = ("incompatible", "no-signal")


def prompt_domains(rows: Sequence[dict], field: str, where: str) -> list[str]:
    """Each row's domain (its `field`, as text); a row without one is an error naming it."""
    out = []
    for i, row in enumerate(rows):
        value = row.get(field) if isinstance(row, dict) else None
        if value is None or str(value).strip() == "":
            raise ValueError(f"{where}: row {i} has no domain field {field!r}")
        out.append(str(value))
    return out


def rank_by_domain(
    scored: dict[str, list[Rollout]],
    domain_of: Sequence[str],
    diagnostics: Callable[[PositionStats], dict[str, float]],
    verdict: Callable[[dict[str, float]], dict[str, Any]],
    rank: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """Per domain: its rollout count and the teachers ranked on that domain's rollouts alone.
    Every teacher scored the same rollouts, so the domains split them identically."""
    if not scored:
        return {}
    first = next(iter(scored.values()))
    domains = sorted({domain_of[r.prompt_index] for r in first})
    out: dict[str, dict[str, Any]] = {}
    for domain in domains:
        entries = []
        count = 0
        for name, rollouts in scored.items():
            mine = [r for r in rollouts if domain_of[r.prompt_index] == domain]
            count = len(mine)
            metrics = diagnostics(PositionStats.from_rollouts(mine))
            entries.append({"name": name, "metrics": metrics, "verdict": verdict(metrics)})
        out[domain] = {"rollouts": count, "ranking": rank(entries)}
    return out


def suggest_routing(domains: dict[str, dict[str, Any]], field: str) -> dict[str, Any]:
    """The best teacher per domain, the `opd train` flags for it, and the domains no teacher
    suits (their best teacher's verdict, to act on before training)."""
    routes: dict[str, str] = {}
    unfit: dict[str, str] = {}
    for domain, entry in domains.items():
        best = entry["ranking"][0]
        routes[domain] = best["name"]
        if best["verdict"]["class"] in _UNFIT:
            unfit[domain] = f"best teacher {best['name']}: {best['verdict']['label']}"
    flags = [f"--teacher-field {field}"] + [f"--route {d}={t}" for d, t in routes.items()]
    return {"field": field, "routes": routes, "flags": flags, "unfit": unfit}
