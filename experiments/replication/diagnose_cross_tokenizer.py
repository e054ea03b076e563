"""A diagnostic of finding 6 (docs/replication.md), outside the verdict: the two-digit teacher
trained for more steps, then OPD across tokenizers from it with student-topk and with sampled.

    OMP_NUM_THREADS=1 python -m experiments.replication.diagnose_cross_tokenizer \\
        runs/replicate-xtok runs/replicate-xtok-long 1200

Reads the student and the data of a finished replication out dir (seed 0's full plan), trains
teacher-x-other-tokenizer's spec for STEPS steps, runs both arms with the plan's OPD budget and
evaluates them and the teacher on the held-out questions; writes OUT/diag.json.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from experiments.replication import run as R
from experiments.replication.models import train_model
from experiments.replication.plan import full_plan


def main(source: Path, out: Path, steps: int, seed: int = 0) -> dict:
    plan = full_plan(seed)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "eval": source / "data" / "eval.jsonl",
        "opd": source / "data" / "opd_prompts.jsonl",
        "coldstart": source / "data" / "coldstart_prompts.jsonl",
    }
    models = {p.name: p for p in (source / "models").iterdir() if p.is_dir()}
    _, exclude = R._data(plan, out / "data", seed)  # the same held-out pairs (same seed)
    spec = next(s for s in plan.models if s.name == "teacher-x-other-tokenizer")
    spec = replace(spec, name=f"{spec.name}-{steps}", steps=steps)
    started = time.time()
    models[spec.name] = train_model(spec, out / "models" / spec.name, exclude, print)
    train_s = round(time.time() - started, 1)
    arms = {"student-topk": {}, "sampled": {"objective": "sampled"}}
    finals, times = {}, {}
    with ExitStack() as stack:
        urls = R._serve([spec.name], models, out, stack)
        for label, flags in arms.items():
            started = time.time()
            finals[label] = R._train(
                plan, models["student"], urls[spec.name], out / "runs" / label, data, seed,
                cross_tokenizer="auto", **flags,
            )  # fmt: skip
            times[label] = round(time.time() - started, 1)
    finals["teacher"] = models[spec.name]
    result = {
        "teacher_steps": steps,
        "train_s": train_s,
        "accuracy": R._evaluate(plan, finals, data, out / "eval", seed),
        "times": times,
    }
    (out / "diag.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])), indent=1))
