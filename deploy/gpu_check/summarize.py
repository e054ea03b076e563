"""The GPU check's verdict: every phase's status and figures, into the results folder.

    python deploy/gpu_check/summarize.py --work SCRATCH --results OUT_DIR --device cuda

Writes at most 8 files, flat, because that is what the GPU host hands back from $OUT:
summary.md and summary.json (the verdict and the figures), numerics.json, bench.json and
bench-train.json (the phases' own reports), details.tar.gz (every log and table of the run:
servers, workers, torchrun, metrics). gpu-check.log is the script's own. Exit status 1 when a
phase failed or a check below did not hold, so the caller sees one status.

Checks beyond each phase's exit status (a phase can exit 0 with little done):
- numerics: the report says passed (numerics.py's tolerances), for float32 and bfloat16;
- bench: every contender asked for has a result with a positive rate (the matmul limit and the
  long sequence too, when asked for);
- bench-train: each flavour has rollout and step figures, and the memory test ran;
- fsdp: both runs logged every step with finite losses, the FSDP run's last checkpoint holds a
  whole model, and its first step's loss equals the plain run's (rel. 1e-3: same rollouts,
  same weights; only reduction order differs).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tarfile
from pathlib import Path
from typing import Any

# `opd bench --contender` values -> the start of their names in the report
BENCH_NAMES = {"inprocess": "in-process", "http-binary": "http binary", "naive": "naive HF"}
FSDP_LOSS_RTOL = 1e-3


def _phases(work: Path) -> dict[str, dict[str, Any]]:
    out = {}
    path = work / "phases.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, code = line.split("\t")
        out[name] = {"status": status, "seconds": int(seconds), "exit": code}
    return out


def _latest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return found[-1] if found else None


def _load(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path and path.is_file() else None


def check_numerics(report: dict | None) -> tuple[list[str], list[str]]:
    """(problems, lines for the summary)."""
    if report is None:
        return ["numerics: no report"], []
    lines = [f"{report['sequences']} sequences, {report['scored_positions']} scored positions"]
    for dtype, d in report["dtypes"].items():
        mark = "passed" if d["passed"] else "FAILED"
        worst = ", ".join(
            f"{k} {v['max']:.1e} (bound {d['bounds'].get(k, {}).get('max', float('nan')):.1e})"
            for k, v in d["errors"].items()
        )
        lines.append(f"{dtype}: max abs error {worst}: {mark}")
        if d.get("plain_hf_errors"):
            base = ", ".join(f"{k} {v['max']:.1e}" for k, v in d["plain_hf_errors"].items())
            lines.append(f"{dtype}: plain HF in {dtype} on the same device, max abs error {base}")
    return list(report["problems"]), lines


def check_bench(report: dict | None) -> tuple[list[str], list[str]]:
    if report is None:
        return ["bench: no report"], []
    problems, lines = [], []
    names = list(report["contenders"])
    asked = report["config"]["contenders"]
    for want in (BENCH_NAMES[c] for c in asked if c in BENCH_NAMES):
        if not any(n.startswith(want) for n in names):
            problems.append(f"bench: no {want} result")
    for name, v in report["contenders"].items():
        if not v["tokens_per_s"] > 0:
            problems.append(f"bench: {name} scored nothing")
        lines.append(f"{name}: {v['tokens_per_s']:.0f} scored tokens/s, p50 {v['p50_ms']:.0f} ms")
    if report.get("limit"):
        lim = report["limit"]
        lines.append(
            f"matmul-bound limit: {lim['tokens_per_s']:.0f} tokens/s "
            f"({lim['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s)"
        )
    elif "matmul" in asked:
        problems.append("bench: no matmul limit")
    ls = report.get("long_sequence")
    if ls:
        lines.append(
            f"long sequence {ls['tokens']} tokens: tiled {ls['chunked_peak_bytes'] / 1e6:.0f} MB"
            f" vs full logits {ls['full_peak_bytes'] / 1e6:.0f} MB"
        )
    elif "longseq" in asked:
        problems.append("bench: no long-sequence result")
    for t in report.get("targets", []):
        lines.append(f"target {t['target']}: {t['value']:.3f} (bound {t['bound']}, met {t['met']})")
    return problems, lines


def check_bench_train(report: dict | None) -> tuple[list[str], list[str]]:
    if report is None:
        return ["bench-train: no report"], []
    problems, lines = [], []
    for flavour in report["config"]["flavours"]:
        roll = report.get("rollouts", {}).get(flavour)
        step = report.get("steps", {}).get(flavour)
        if not roll or not roll["tokens_per_s"] > 0:
            problems.append(f"bench-train: no rollouts for {flavour}")
        else:
            lines.append(f"{flavour}: rollouts {roll['tokens_per_s']:.0f} tokens/s")
        if not step or not step["step_s"] > 0:
            problems.append(f"bench-train: no OPD step for {flavour}")
        else:
            tokens = step["tokens"]
            lines.append(f"{flavour}: OPD step {step['step_s']:.2f} s ({tokens:.0f} tokens)")
    mem = report.get("memory")
    if not mem:
        problems.append("bench-train: no student-math memory result")
    else:
        lines.append(
            f"student math on {mem['tokens']} positions: loss peak "
            f"{mem['loss_full_peak_bytes'] / 1e6:.0f} MB full vs "
            f"{mem['loss_chunked_peak_bytes'] / 1e6:.0f} MB chunked"
        )
    return problems, lines


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_fsdp(work: Path, steps: int) -> tuple[list[str], list[str], dict[str, Any]]:
    fsdp, plain = _metrics(work / "fsdp"), _metrics(work / "plain")
    problems, lines = [], []
    for name, rows in (("fsdp", fsdp), ("plain", plain)):
        if len(rows) != steps or not steps:
            problems.append(f"fsdp: the {name} run logged {len(rows)} of {steps} steps")
        elif not all(math.isfinite(r["train/loss"]) for r in rows):
            problems.append(f"fsdp: the {name} run has a non-finite loss")
    ckpt = work / "fsdp" / "checkpoints" / f"step_{steps}" / "model" / "model.safetensors"
    if steps and not ckpt.is_file():
        problems.append(f"fsdp: no whole-model checkpoint at {ckpt.relative_to(work)}")
    figures: dict[str, Any] = {"steps": steps}
    if fsdp and plain:
        a, b = plain[0]["train/loss"], fsdp[0]["train/loss"]
        rel = abs(a - b) / max(abs(a), 1e-12)
        figures.update({"plain_step1_loss": a, "fsdp_step1_loss": b, "step1_rel_diff": rel})
        lines.append(f"step-1 loss: FSDP2 {b:.6f} vs plain {a:.6f} (rel. diff {rel:.1e})")
        if rel > FSDP_LOSS_RTOL:
            problems.append(f"fsdp: step-1 loss differs by {rel:.1e} (> {FSDP_LOSS_RTOL})")
        times = [r.get("time/step_s") for r in fsdp if r.get("time/step_s")]
        if times:
            lines.append(f"FSDP2 step time: {', '.join(f'{t:.2f}' for t in times)} s")
    return problems, lines, figures


def _tar_details(work: Path, results: Path) -> None:
    """Every log and table of the run (not the models, not the installed packages)."""
    skip = {"models", "site", "build-tools", "src", "opd-cache"}
    with tarfile.open(results / "details.tar.gz", "w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.name in skip:
                continue
            tar.add(path, arcname=path.name, filter=_small_files)


def _small_files(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Checkpoints' weights stay out (the results must stay small), the rest goes in."""
    if info.isfile() and (info.name.endswith(".safetensors") or info.size > 4_000_000):
        return None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="gpu")
    parser.add_argument("--fsdp-steps", type=int, default=0, help="steps each train run took")
    args = parser.parse_args()
    work, results = args.work, args.results
    results.mkdir(parents=True, exist_ok=True)
    phases = _phases(work)
    numerics = _load(work / "numerics" / "numerics.json")
    bench_path = _latest(work / "bench", "bench-*.json")
    train_path = _latest(work / "bench-train", "bench-train-*.json")
    bench, train = _load(bench_path), _load(train_path)

    sections: dict[str, dict[str, Any]] = {}
    for name, (problems, lines) in {
        "numerics": check_numerics(numerics),
        "bench": check_bench(bench),
        "bench-train": check_bench_train(train),
    }.items():
        sections[name] = {"problems": problems, "lines": lines}
    fsdp_problems, fsdp_lines, fsdp_figures = check_fsdp(work, args.fsdp_steps)
    sections["fsdp"] = {"problems": fsdp_problems, "lines": fsdp_lines, "figures": fsdp_figures}
    for name, phase in phases.items():
        if phase["status"] != "ok":
            sections.setdefault(name, {"problems": [], "lines": []})
            sections[name]["problems"].insert(0, f"{name}: phase {phase['status']}")
    problems = [p for s in sections.values() for p in s["problems"]]

    carried = {}
    carried_path = work / "carried.tsv"
    if carried_path.is_file():
        for line in carried_path.read_text().splitlines():
            key, value = line.split("\t")
            carried[key] = int(value)
    models = _load(work / "models" / "models.json")
    summary = {
        "passed": not problems,
        "device": args.device,
        "size": args.size,
        "machine": (bench or train or {}).get("machine"),
        "versions": (bench or train or {}).get("versions"),
        "carried_kib": carried,
        "models": models,
        "phases": phases,
        "problems": problems,
        "sections": sections,
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2))

    md = [f"# GPU check: {'PASSED' if not problems else 'FAILED'}", ""]
    md.append(f"device {args.device}, shapes {args.size}")
    if summary["versions"]:
        md.append("versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    if carried:
        tree, wheels = carried.get("tree_kib", 0) / 1024, carried.get("wheels_kib", 0) / 1024
        md.append(
            f"carried: {tree + wheels:.1f} MiB: tree {tree:.1f} MiB + wheels {wheels:.1f} MiB "
            "(limit 64 MiB)"
        )
    if models:
        for role in ("teacher", "student"):
            m = models[role]
            md.append(
                f"{role}: {m['parameters']:,} parameters, hidden {m['hidden']}, "
                f"{m['layers']} layers, vocabulary {models['vocab']}"
            )
    md += ["", "| phase | status | seconds |", "|---|---|---:|"]
    md += [f"| {n} | {p['status']} | {p['seconds']} |" for n, p in phases.items()]
    for name, section in sections.items():
        md += ["", f"## {name}", ""]
        md += [f"- {line}" for line in section["lines"]]
        md += [f"- **problem:** {p}" for p in section["problems"]]
    for path, title in ((bench_path, "bench table"), (train_path, "bench-train table")):
        table = path.with_suffix(".md") if path else None
        if table and table.is_file():
            md += ["", f"## {title}", "", table.read_text()]
    (results / "summary.md").write_text("\n".join(md) + "\n")

    for src, dst in (
        (work / "numerics" / "numerics.json", "numerics.json"),
        (bench_path, "bench.json"),
        (train_path, "bench-train.json"),
    ):
        if src and src.is_file():
            shutil.copyfile(src, results / dst)
    _tar_details(work, results)
    print((results / "summary.md").read_text())
    raise SystemExit(0 if not problems else 1)


if __name__ == "__main__":
    main()
