"""Everything the README shows runs: its curl and Python examples, `opd serve` (both ways of
starting it) and the main job, `opd quickstart`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from opd.client.teacher.launch import LocalTeacher, free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _at(url: str, text: str) -> str:
    return text.replace("http://127.0.0.1:8000", url)


def test_readme_curl_example(smol_server):
    (curl,) = [b for b in _blocks("bash") if b.lstrip().startswith("curl") and "/v1/score" in b]
    out = subprocess.run(
        ["bash", "-c", _at(smol_server, curl)], capture_output=True, text=True, check=True
    )
    body = json.loads(out.stdout)
    result = body["results"][0]
    assert len(result["token_logprobs"]) == 3
    assert len(result["candidate_logprobs"]) == 3 and len(result["candidate_logprobs"][0]) == 2
    assert len(result["top_k_ids"][0]) == 3 and len(result["entropy"]) == 3
    # the real SmolLM2 is confident that Paris is the capital of France
    assert result["token_logprobs"][1] > -1.0
    assert result["top_k_ids"][1][0] == 7042
    # candidate column 0 at row 1 is " Paris" (7042): same number as the actual token
    assert abs(result["candidate_logprobs"][1][0] - result["token_logprobs"][1]) < 1e-6


def test_readme_generate_example(smol_server):
    (curl,) = [b for b in _blocks("bash") if b.lstrip().startswith("curl") and "/generate" in b]
    out = subprocess.run(
        ["bash", "-c", _at(smol_server, curl)], capture_output=True, text=True, check=True
    )
    (result,) = json.loads(out.stdout)["results"]
    assert len(result["completions"]) == 2
    assert all(c["text"] and len(c["token_ids"]) <= 32 for c in result["completions"])


def test_readme_python_example(smol_server):
    (code,) = _blocks("python")
    out = subprocess.run(
        [sys.executable, "-c", _at(smol_server, code)], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("SmolLM2-135M-Instruct ")
    assert "(3, 2)" in out.stdout


def test_cli_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "opd.client.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    commands = ("serve", "train", "quickstart", "score-demo", "bench", "probe", "coldstart")
    for command in (*commands, "select-prompts", "report", "eval"):
        assert command in out.stdout


def test_opd_serve_flags(tiny_model_dir, tmp_path):
    teacher = LocalTeacher(
        str(tiny_model_dir),
        log_path=tmp_path / "serve.log",
        extra_args=["--dtype", "float32", "--device", "cpu", "--host", "127.0.0.1"],
    )
    with teacher as url:
        info = httpx.get(url + "/v1/model").json()
    assert info["dtype"] == "float32"
    assert teacher.process is not None and teacher.process.returncode == 0


def test_uvicorn_factory_with_environment_settings(tiny_model_dir, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "OPD_MODEL": str(tiny_model_dir),
        "OPD_MAX_TOP_K": "7",
        "OPD_API_KEY": "factory-key",
    }
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "opd.server.app:create_app",
        "--factory",
        "--port",
        str(port),
    ]
    with open(tmp_path / "uvicorn.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            teacher = LocalTeacher(port=port)
            teacher.process = proc
            teacher.wait_ready()
            headers = {"Authorization": "Bearer factory-key"}
            info = httpx.get(f"http://127.0.0.1:{port}/v1/model", headers=headers).json()
            assert info["limits"]["max_top_k"] == 7
        finally:
            proc.terminate()
            proc.wait(30)


def test_score_demo():
    out = subprocess.run(
        [sys.executable, "-m", "opd.client.cli", "score-demo"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "teacher service ready" in out.stdout
    assert "(matches)" in out.stdout
    sums = [float(x) for x in re.findall(r"sum log q = (-?[\d.]+)", out.stdout)]
    assert len(sums) == 2 and sums[0] > sums[1] + 3, sums  # Paris beats Berlin clearly


# What the README says the quickstart measured ("fell from 2.81 to 2.17"), and how far a run on
# another machine may land from it (the README states the same bounds): seeds fix the prompts
# and samples, but CPU kernels differ between machines, and 8 prompts x 2 rollouts are few.
_N = r"(\d+(?:\.\d+)?)"
README_FIGURES = {
    "kl/sampled": rf"sampled-token reverse KL on held-out prompts fell from {_N} to {_N}",
    "overlap/ratio": rf"top-16 overlap rose from {_N} to {_N}",
    "entropy/gap": rf"entropy gap fell from {_N} to {_N}",
}
README_TOLERANCE = {"kl/sampled": 0.3, "overlap/ratio": 0.05, "entropy/gap": 0.3}


def readme_quickstart_figures() -> dict[str, tuple[float, float]]:
    text = " ".join(README.split())
    out = {}
    for key, pattern in README_FIGURES.items():
        match = re.search(pattern, text)
        assert match, f"the README no longer states {key}: {pattern}"
        out[key] = (float(match.group(1)), float(match.group(2)))
    return out


def test_the_readme_states_the_quickstart_figures_and_their_tolerance():
    figures = readme_quickstart_figures()
    assert set(figures) == set(README_TOLERANCE)
    text = " ".join(README.split())
    assert "within 0.3 nats (KL), 0.3 (entropy gap) and 0.05 (overlap)" in text


# The quickstart alone measured ~460-500 s on a busy 2-core machine (706 s with the install):
# pytest's default 600 s bound left no margin, so this test gets 1800 s, as its subprocess does.
@pytest.mark.timeout(1800)
def test_quickstart_main_job_moves_the_student_toward_the_teacher(tmp_path):
    """`opd quickstart` exactly as the README runs it (no flags), on the real SmolLM2."""
    out = subprocess.run(
        [sys.executable, "-m", "opd.client.cli", "quickstart"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
        # 80 columns, as a small terminal; native stderr to the log as on a terminal
        env={**os.environ, "COLUMNS": "80", "OPD_NATIVE_STDERR_TO_LOG": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "student before vs after OPD" in out.stdout
    (result_file,) = tmp_path.glob("runs/quickstart-*/quickstart.json")
    result = json.loads(result_file.read_text())
    before, after = result["before"], result["after"]
    assert after["kl/sampled"] < before["kl/sampled"] - 0.2, (before, after)
    assert after["overlap/ratio"] > before["overlap/ratio"], (before, after)
    # The figures the README states are this run's, within the tolerance it states: a change
    # that moves them fails here until the README moves too.
    for key, (was, now) in readme_quickstart_figures().items():
        tol = README_TOLERANCE[key]
        assert before[key] == pytest.approx(was, abs=tol), (key, before[key], was)
        assert after[key] == pytest.approx(now, abs=tol), (key, after[key], now)
    # the libraries' notices went to the run's log, not to the user's terminal
    log_text = (result_file.parent / "quickstart.log").read_text()
    assert "NUMA binding" in log_text or "vllm" in log_text.lower()
    for noise in ("NUMA binding", "Loading safetensors", "FutureWarning", "it/s]"):
        assert noise not in out.stdout + out.stderr, noise
    assert "…" not in out.stdout  # nothing cut at 80 columns
    metrics = [json.loads(line) for line in (result_file.parent / "metrics.jsonl").open()]
    assert len(metrics) == 24
    # sampled by the vllm engine (installed by `make install`), on the current weights each step
    assert all(m["rollout/engine_logp_abs_diff_max"] < 1e-3 for m in metrics)
    assert len(list((result_file.parent / "rollouts").glob("step_*.parquet"))) == 24
