"""Hand-made results.json contents for the replication's verdict rules: a run in which every
finding reproduces (`made_to_reproduce`), and the same run with some accuracies changed
(`with_accuracies`). The single-seed rules (test_tables.py) and the rules over seeds
(test_seeds.py) are tested on the same runs."""

from __future__ import annotations

import copy

from experiments.replication.plan import OPD_RUNS

HALF = 0.05  # the half-width of every hand-made 95% interval


def _acc(value: float) -> dict:
    return {"accuracy": value, "ci": [max(0.0, value - HALF), min(1.0, value + HALF)]}


def _teacher(name: str, overlap: float, kl: float, verdict: str) -> dict:
    return {
        "name": name,
        "metrics": {
            "overlap/ratio": overlap,
            "overlap/token_advantage": 0.0,
            "entropy/gap": 0.0,
            "kl/sampled": kl,
        },
        "verdict": {"class": verdict},
        "outcome": {"auroc": 0.9},
    }


def depth_probe(advantages: dict[int, tuple[float, float, float]]) -> dict:
    """A depth probe: teacher-x's advantage (and its 95% interval) by prefix length."""
    return {
        "by_prefix": [
            {
                "prefix_tokens": p,
                "rollouts": 128,
                "teachers": {"teacher-x": {"advantage": a, "advantage_ci": [lo, hi]}},
            }
            for p, (a, lo, hi) in advantages.items()
        ]
    }


def _run(steps: int = 10, xtok: bool = False) -> list[dict]:
    cross = {
        "xtok/one_to_one_frac": 0.8,
        "xtok/student_tokens_per_chunk": 1.2,
        "time/align_s": 0.01,
    }
    return [
        {
            "step": s,
            "overlap/ratio": 0.5 + 0.01 * s,
            "reward/seq_mean@depth0-7": -0.1,
            "time/step_s": 0.5,
            **(cross if xtok else {}),
        }
        for s in range(1, steps + 1)
    ]


def made_to_reproduce() -> dict:
    """A run in which every finding reproduces."""
    accuracy = {
        "student": 0.70,
        "teacher-x": 1.00,
        "teacher-y": 1.00,
        "same-pipeline": 0.75,
        "opd-from-x": 0.95,
        "opd-from-y": 0.05,
        "opd-from-same-pipeline": 0.71,
        "opd-from-self": 0.69,
        "reverse": 0.80,
        "coldstart-sft": 0.40,
        "coldstart+opd-from-y": 0.60,
        "teacher-x-other-tokenizer": 1.00,
        "opd-from-x-other-tokenizer": 0.93,
    }
    return {
        "tiny": False,
        "seed": 0,
        "accuracy": {k: _acc(v) for k, v in accuracy.items()},
        "probe_before": {
            "teachers": [
                _teacher("teacher-x", 0.70, 0.10, "good"),
                _teacher("teacher-y", 0.35, 8.0, "borderline"),
                _teacher("same-pipeline", 0.70, 0.05, "good"),
                _teacher("student", 1.00, 0.00, "no-signal"),
            ],
            "depth_probe": depth_probe(
                {0: (0.20, 0.10, 0.30), 8: (0.10, 0.0, 0.2), 16: (0.05, 0, 0.1)}
            ),
        },
        "probe_after": {"depth_probe": depth_probe({0: (0.01, 0.0, 0.03), 16: (0.0, 0.0, 0.0)})},
        "runs": {label: _run(xtok=label == "opd-from-x-other-tokenizer") for label in OPD_RUNS},
        "plan": {
            "models": [
                {"name": n, "role": n, "style": "x"}
                for n in (
                    "student",
                    "teacher-x",
                    "teacher-y",
                    "same-pipeline",
                    "teacher-x-other-tokenizer",
                )
            ]
        },
        "timing": {"total_s": 1.0, "models_s": 1.0},
    }


def with_accuracies(results: dict, **accuracies: float) -> dict:
    """`results` with these accuracies (opd_from_x=0.7; coldstart_plus_opd_from_y=...)."""
    changed = copy.deepcopy(results)
    for label, value in accuracies.items():
        changed["accuracy"][label.replace("_", "-").replace("-plus-", "+")] = _acc(value)
    return changed
