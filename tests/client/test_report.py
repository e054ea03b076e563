"""`opd report`: a real training run against a real teacher process, plus probe / coldstart /
quickstart files that follow their schemas, built into PNGs and one HTML page that headless
Chromium renders; the health checks on constructed metric sequences."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from opd.client.report.build import build_report, report_command
from opd.client.report.health import health_checks, window_slices
from opd.client.report.inputs import ReportError, Series, load_inputs
from opd.client.train.diagnostics import PositionStats, compute_diagnostics
from opd.client.train.trainer import Trainer
from tests.support.train_config import train_config

STEP_PLOTS = {
    "kl",
    "overlap_ratio",
    "overlap_advantage",
    "entropy",
    "overlap_mass",
    "reward",
    "optimisation",
    "rollouts",
    "time",
}
DEPTH_PLOTS = {"depth_profile", "depth_heatmap"}
PROBE_PLOTS = {"probe_metrics", "probe_depth"}
COLDSTART_PLOTS = {"sft_loss", "coldstart_counts"}
OUTCOME_PLOTS = {"eval_accuracy", "eval_sources", "probe_depth_continuation"}
TEACHERS = ("SmolLM2-135M-Instruct", "Other-Style-1B", "Tiny-Teacher")


# --------------------------------------------------------------------------------------------
# Inputs: a real run, and probe / coldstart / quickstart files following their schemas
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_run(tiny_server, tiny_student_dir, tmp_path_factory) -> Path:
    """`opd train` on the tiny models: 5 steps, 12 new tokens, depth buckets of 4 positions."""
    run_dir = tmp_path_factory.mktemp("report-run")
    config = train_config(
        tiny_student_dir,
        tiny_server,
        run_dir,
        max_steps=5,
        max_new_tokens=12,
        checkpoint_every=1000,
    )
    with Trainer(config) as trainer:
        trainer.run()
    return run_dir


def _diagnostics(noise: float, seed: int) -> dict[str, float]:
    """compute_diagnostics of a student that is the teacher plus `noise` on its logits:
    3 sequences of 10 positions, vocabulary 64, k = 8, depth buckets of 4."""
    rng = np.random.default_rng(seed)
    n_pos, vocab, k = 30, 64, 8
    logits_q = rng.normal(size=(n_pos, vocab)) * 3
    logits_p = logits_q + rng.normal(size=(n_pos, vocab)) * noise
    logq = logits_q - np.log(np.exp(logits_q).sum(1, keepdims=True))
    logp = logits_p - np.log(np.exp(logits_p).sum(1, keepdims=True))
    y = np.array([rng.choice(vocab, p=np.exp(row)) for row in logp])
    rows = np.arange(n_pos)[:, None]
    s_ids = np.argsort(-logp, axis=1)[:, :k]
    t_ids = np.argsort(-logq, axis=1)[:, :k]
    stats = PositionStats(
        student_topk_ids_NK=s_ids,
        student_topk_logp_NK=logp[rows, s_ids],
        teacher_topk_ids_Nk=t_ids,
        teacher_topk_logp_Nk=logq[rows, t_ids],
        teacher_cand_logp_NK=logq[rows, s_ids],
        student_token_logp_N=logp[np.arange(n_pos), y],
        teacher_token_logp_N=logq[np.arange(n_pos), y],
        student_entropy_N=-(np.exp(logp) * logp).sum(1),
        teacher_entropy_N=-(np.exp(logq) * logq).sum(1),
        seq_offsets=np.array([0, 10, 20, 30]),
    )
    return compute_diagnostics(stats, depth_bucket=4)


def write_probe(run_dir: Path) -> None:
    teachers = []
    for rank, (name, noise) in enumerate(zip(TEACHERS, (0.5, 2.0, 4.0), strict=True), start=1):
        metrics = _diagnostics(noise, seed=rank)
        compatible = metrics["overlap/ratio"] >= 0.5
        signal = metrics["kl/sampled"] > 0.05
        label = {
            (True, True): "compatible, real signal",
            (True, False): "compatible, no new signal",
        }.get((compatible, signal), "incompatible")
        teachers.append(
            {
                "name": name,
                "url": f"http://10.0.0.{rank}:8000",
                "rank": rank,
                "metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()},
                "verdict": {
                    "label": label,
                    "compatible": compatible,
                    "signal": signal,
                    "reasons": [
                        f"overlap {metrics['overlap/ratio']:.2f} "
                        f"{'>=' if compatible else '<'} 0.50",
                        f"reverse KL {metrics['kl/sampled']:.2f}",
                    ],
                },
            }
        )
    probe = {
        "version": 1,
        "student": "/models/student",
        "prompts": 64,
        "rollouts_per_prompt": 1,
        "positions": 1234,
        "config": {"max_new_tokens": 256, "top_k": 8, "depth_bucket": 4},
        "teachers": teachers,
    }
    (run_dir / "probe.json").write_text(json.dumps(probe, indent=1))


def write_coldstart(run_dir: Path) -> None:
    coldstart = {
        "version": 1,
        "teacher": "http://10.0.0.1:8000",
        "student_in": "/models/student",
        "student_out": "runs/cs/student",
        "dataset": "runs/cs/sft.jsonl",
        "counts": {
            "prompts": 40,
            "responses": 40,
            "kept": 31,
            "truncated": 5,
            "repetition": 2,
            "no_answer": 0,
            "empty": 2,
        },
        "split": {"sft_prompts": 40, "opd_prompts": 24},
        "sft": {"epochs": 1, "lr": 1e-5, "steps": 8, "final_loss": 1.23},
    }
    (run_dir / "coldstart.json").write_text(json.dumps(coldstart, indent=1))
    lines = [
        {"step": s, "sft/loss": 2.3 - 0.15 * s, "sft/lr": 1e-5 * (1 - s / 9), "sft/epoch": 0}
        for s in range(1, 9)
    ]
    (run_dir / "sft_metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def write_outcomes(run_dir: Path) -> None:
    """The outcome inputs, in the shapes opd writes them: eval.jsonl (opd train --eval-set),
    eval.json (opd eval), and the probe's outcome and depth-probe entries."""
    lines = [
        {"step": s, "accuracy": a, "accuracy_lo": a - 0.1, "accuracy_hi": a + 0.1,
         "pass_at_n": a, "extraction_failure_rate": 0.1, "truncated_rate": 0.0,
         "teacher_accuracy": 0.7, "gap_recovery": (a - 0.2) / 0.5}
        for s, a in ((0, 0.2), (2, 0.35), (5, 0.6))
    ]  # fmt: skip
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"mean_at_n": 0.6, "mean_at_n_interval": [0.5, 0.7], "pass_at_k": 0.6,
               "pass_at_k_interval": [0.5, 0.7], "extraction_failures": 3}  # fmt: skip
    sources = [
        {"kind": kind, "label": label, "summary": {**summary, "mean_at_n": acc}}
        for kind, label, acc in (("student", "before", 0.2), ("student", "after", 0.6),
                                 ("teacher", "SmolLM2-135M-Instruct", 0.7))
    ]  # fmt: skip
    gap = [{"before": "before", "after": "after", "teacher": "SmolLM2-135M-Instruct",
            "gap_recovery": 0.8}]  # fmt: skip
    (run_dir / "eval.json").write_text(
        json.dumps(
            {
                "version": 1,
                "data": "task:multiplication:eval",
                "items": 60,
                "sources": sources,
                "gap_recovery": gap,
                "config": {"n": 1},
            }
        )  # fmt: skip
    )
    probe = json.loads((run_dir / "probe.json").read_text())
    probe["student_outcome"] = {"mean_at_n": 0.3, "mean_at_n_interval": [0.2, 0.4], "prompts": 40}
    for t in probe["teachers"]:
        t["outcome"] = {"auroc": 0.73, "rollouts": 40, "correct": 12,
                        "reward_mean_correct": -0.5, "reward_mean_wrong": -1.5}  # fmt: skip

    def row(n: int, s: float, t: float) -> dict:
        ci = [t - s - 0.1, t - s + 0.1]
        teacher = {"accuracy": t, "advantage": t - s, "advantage_ci": ci}
        return {"prefix_tokens": n, "rollouts": 20, "student": {"accuracy": s},
                "teachers": {TEACHERS[0]: teacher}}  # fmt: skip

    probe["depth_probe"] = {"samples": 2, "by_prefix": [row(0, 0.2, 0.6), row(16, 0.2, 0.3)]}
    (run_dir / "probe.json").write_text(json.dumps(probe))


def write_quickstart(run_dir: Path) -> None:
    before = _diagnostics(2.0, seed=7)
    after = _diagnostics(1.0, seed=7)
    (run_dir / "quickstart.json").write_text(
        json.dumps({"before": before, "after": after}, indent=1, allow_nan=True)
    )


# --------------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "chromium not found: the report test renders the page in headless Chromium "
            "(Debian: apt-get install chromium; .ci/run installs it)"
        )
    return path


def _chromium_run(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
        page.resolve().as_uri(),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


# --------------------------------------------------------------------------------------------
# The report end to end
# --------------------------------------------------------------------------------------------


def test_report_of_a_real_run_with_every_input_renders_in_chromium(real_run, tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("metrics.jsonl", "config.json"):
        shutil.copy(real_run / name, run_dir / name)
    write_probe(run_dir)
    write_coldstart(run_dir)
    write_quickstart(run_dir)
    write_outcomes(run_dir)

    page = build_report(run_dir)

    assert page == run_dir / "report" / "report.html"
    pngs = sorted(page.parent.glob("*.png"))
    assert {p.stem for p in pngs} == (
        STEP_PLOTS | DEPTH_PLOTS | PROBE_PLOTS | COLDSTART_PLOTS | OUTCOME_PLOTS
    )
    text = page.read_text()
    for png in pngs:  # every PNG written is embedded, byte for byte
        assert base64.b64encode(png.read_bytes()).decode() in text
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<link" not in text and "<script src" not in text

    dom = _chromium_run(page, tmp_path / "profile", "--dump-dom").stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    ok = re.search(r'data-images-ok="(\d+)"', body.group(0))
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    assert ok and total, body.group(0)
    assert int(ok.group(1)) == int(total.group(1)) == len(pngs)
    for heading in (
        "Health",
        "Training over steps",
        "By depth",
        "Teacher probe",
        "Cold start",
        "Quickstart: before / after",
        "Outcome: accuracy",
        "Run config",
    ):
        assert f">{heading}</h2>" in dom, heading
    for fragment in (
        "overlap ratio rises",
        "overlap-token advantage moves toward 0",
        "entropy gap closes",
        "gradient norm is not tiny from the start",
        *TEACHERS,
        "compatible, real signal",
        "31 of 40 responses",
        "kl/sampled",
        "Reward AUROC",
        "gap recovery",
        "Depth probe",
    ):
        assert fragment in dom, fragment

    shot = tmp_path / "shot.png"
    _chromium_run(
        page, tmp_path / "profile", "--window-size=1200,2400", "--hide-scrollbars",
        f"--screenshot={shot}",
    )  # fmt: skip
    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    # text, badges and plots: far from a blank or single-colour page
    assert colors is None or len(colors) > 200


def test_health_checks_of_the_real_run_are_all_decided(real_run):
    checks = health_checks(load_inputs(real_run).metrics)
    assert len(checks) == 7
    assert all(c.status in ("ok", "warning") for c in checks), checks
    for c in checks:
        assert "->" in c.numbers or "grad_norm" in c.numbers, c


def test_report_command_on_a_probe_only_folder(tmp_path):
    app = typer.Typer()
    app.command("report")(report_command)
    app.command("noop")(lambda: None)  # two commands, so `report` is a subcommand as in opd's CLI
    write_probe(tmp_path)
    probe = json.loads((tmp_path / "probe.json").read_text())
    probe["teachers"].append(  # `opd probe` lists a teacher it could not reach, with the error
        {"url": "http://10.0.0.9:8000", "name": "Down-Teacher", "rank": 4, "error": "refused"}
    )
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    out_dir = tmp_path / "elsewhere"

    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out-dir", str(out_dir)])

    assert result.exit_code == 0, result.output
    page = out_dir / "report.html"
    assert f"report: {page}" in result.output
    assert {p.stem for p in out_dir.glob("*.png")} == PROBE_PLOTS
    text = page.read_text()
    assert ">Teacher probe</h2>" in text and ">Health</h2>" not in text
    # teachers in rank order, with their verdicts
    positions = [text.index(name) for name in (*TEACHERS, "Down-Teacher")]
    assert positions == sorted(positions)
    assert "not probed" in text and "refused" in text
    assert 'data-images-total="2"' in text


def test_report_command_names_what_it_looked_for(tmp_path):
    app = typer.Typer()
    app.command("report")(report_command)
    app.command("noop")(lambda: None)

    result = CliRunner().invoke(app, ["report", str(tmp_path)])

    assert result.exit_code != 0
    flat = " ".join(result.output.split())
    for name in ("metrics.jsonl", "probe.json", "coldstart.json", "quickstart.json"):
        assert name in flat, result.output
    bad = CliRunner().invoke(app, ["report", str(tmp_path), "--window", "0.7"])
    assert bad.exit_code != 0 and "0.5" in bad.output


def test_quickstart_only_folder_gives_a_before_after_table(tmp_path):
    write_quickstart(tmp_path)
    page = build_report(tmp_path)
    text = page.read_text()
    assert ">Quickstart: before / after</h2>" in text
    assert "top-k overlap ratio" in text and 'data-images-total="0"' in text
    assert not list(page.parent.glob("*.png"))


def test_importing_the_report_module_is_cheap():
    code = (
        "import sys, opd.client.report.build, opd.client.report.html; "
        "print(sorted(m for m in ('matplotlib', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------


def test_series_reads_nulls_resumes_and_depth_buckets_in_order():
    records = [
        {"step": 1, "overlap/ratio": 0.1, "overlap/ratio@depth1024-2047": 0.2},
        {"step": 2, "overlap/ratio": None, "overlap/ratio@depth0-1023": 0.3, "note": "x"},
        {"step": 2, "overlap/ratio": 0.4, "overlap/ratio@depth0-1023": 0.5},  # resumed: kept
        {"step": 3, "overlap/ratio": None, "overlap/ratio@depth2048-3071": 0.6},
    ]
    series = Series.from_records(records)
    assert series.steps_S.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(series.columns["overlap/ratio"], [0.1, 0.4, np.nan])
    assert "note" not in series.columns
    buckets, m = series.depth_matrix("overlap/ratio")
    assert buckets == [(0, 1023), (1024, 2047), (2048, 3071)]
    np.testing.assert_array_equal(m[:, 0], [np.nan, 0.5, np.nan])
    assert series.get("missing") is None


def test_unreadable_inputs_are_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kl/sampled": 1.0}\n{"step": 2,\n')
    with pytest.raises(ReportError, match=r"metrics\.jsonl:2"):
        load_inputs(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "probe.json").write_text(json.dumps({"version": 2, "teachers": []}))
    with pytest.raises(ReportError, match="version 2"):
        load_inputs(tmp_path)
    with pytest.raises(ReportError, match="not a folder"):
        load_inputs(tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# Health checks on constructed runs
# --------------------------------------------------------------------------------------------


def _run(n: int = 20, **curves: tuple[float, float]) -> Series:
    """A run of n steps whose metrics go linearly from a to b (key=(a, b)); a key with '@' is a
    depth column."""
    t = np.linspace(0.0, 1.0, n)
    keys = {k.replace("__", "/"): ab for k, ab in curves.items()}
    records = [
        {"step": i + 1} | {k: a + (b - a) * t[i] for k, (a, b) in keys.items()} for i in range(n)
    ]
    return Series.from_records(records)


HEALTHY = {
    "overlap__ratio": (0.55, 0.75),
    "overlap__token_advantage": (-0.30, -0.10),
    "entropy__gap": (1.5, 0.9),
    "train__grad_norm": (0.8, 0.4),
    "entropy__student": (3.0, 2.7),
    "entropy__teacher": (2.5, 2.5),
    "rollout__truncated_frac": (0.10, 0.05),
    "overlap__ratio@depth0-15": (0.6, 0.8),
    "overlap__ratio@depth16-31": (0.5, 0.7),
}
FAILING = {
    "overlap__ratio": (0.30, 0.30),
    "overlap__token_advantage": (-0.40, -0.39),
    "entropy__gap": (1.5, 1.6),
    "train__grad_norm": (1e-3, 1e-3),
    "entropy__student": (3.0, 5.0),
    "entropy__teacher": (2.5, 2.5),
    "rollout__truncated_frac": (0.10, 0.50),
    "overlap__ratio@depth0-15": (0.35, 0.35),
    "overlap__ratio@depth16-31": (0.30, 0.20),
}


def test_a_healthy_run_passes_every_check():
    checks = health_checks(_run(**HEALTHY))
    assert [c.status for c in checks] == ["ok"] * 7, checks


def test_the_papers_failure_signature_warns_on_every_check():
    checks = {c.name: c for c in health_checks(_run(**FAILING))}
    assert all(c.status == "warning" for c in checks.values()), checks
    overlap = checks["overlap ratio rises"]
    assert "flat or falling" in overlap.message
    assert "0.3 -> 0.3" in overlap.numbers and "steps 1-4 vs 17-20" in overlap.numbers
    assert "blowing up" in checks["student entropy neither blows up nor collapses"].message
    assert "depth16-31" in checks["overlap at the deepest positions does not fall"].numbers


@pytest.mark.parametrize(
    "change,status",
    [
        ({"overlap__ratio": (0.92, 0.92)}, "ok"),  # flat, but at the ceiling
        ({"overlap__ratio": (0.5, 0.45)}, "warning"),  # falling
        ({"overlap__token_advantage": (-0.02, -0.03)}, "ok"),  # near 0 already
        ({"entropy__gap": (0.05, 0.06)}, "ok"),  # already closed
        ({"entropy__student": (2.0, 0.02)}, "warning"),  # collapse
        ({"entropy__student": (1.0, 1.5), "entropy__teacher": (2.5, 2.5)}, "ok"),  # toward q
    ],
)
def test_edge_cases_of_single_checks(change, status):
    key = next(iter(change))
    name = {
        "overlap__ratio": "overlap ratio rises",
        "overlap__token_advantage": "overlap-token advantage moves toward 0",
        "entropy__gap": "entropy gap closes",
        "entropy__student": "student entropy neither blows up nor collapses",
    }[key]
    checks = {c.name: c for c in health_checks(_run(**{**HEALTHY, **change}))}
    assert checks[name].status == status, checks[name]


def test_checks_without_data_are_not_applicable():
    assert {c.status for c in health_checks(_run(n=1, **HEALTHY))} <= {"n/a", "ok"}
    checks = health_checks(_run(**{"train__loss": (1.0, 0.5)}))
    assert [c.status for c in checks] == ["n/a"] * 7
    # null (nan) steps are skipped, not propagated
    records = [{"step": 1, "overlap/ratio": 0.5}, {"step": 2, "overlap/ratio": None}]
    records += [{"step": 3, "overlap/ratio": 0.7}]
    (overlap, *_) = health_checks(Series.from_records(records), frac=0.5)
    assert overlap.status == "ok" and "0.5 -> 0.7" in overlap.numbers


def test_windows_are_disjoint_and_never_empty():
    for n in range(2, 40):
        a, b = window_slices(n, 0.2)
        assert a.stop - a.start >= 1 and a.stop <= b.start and b.stop == n
    assert window_slices(20, 0.2) == (slice(0, 4), slice(16, 20))
