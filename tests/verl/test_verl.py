"""opd as verl's teacher, run by verl itself: verl 0.9.1 in its own venv (.venv-verl, built by
`make test`), opd servers from this one, every number checked here against `/v1/score` and an
independent float64 computation.

The configs are the ones docs/integrations.md shows, read from that page, with its placeholder
hosts replaced by the servers started here. verl's side runs in tests/support/verl_check.py,
which never imports opd before `import verl`: the plugin must come through verl's entry points.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from opd.client import TeacherClient
from opd.shared.schemas import ScoreRequest, SequenceIn
from tests.conftest import _teacher
from tests.support.keys import TEST_API_KEY
from tests.support.reference import ReferenceModel

ROOT = Path(__file__).resolve().parents[2]
VERL_PYTHON = ROOT / ".venv-verl" / "bin" / "python"
CHECK = ROOT / "tests" / "support" / "verl_check.py"
DOCS = ROOT / "docs" / "integrations.md"
ATOL = 1e-4  # float32 teacher against the float64 reference (as tests/server/test_numerics.py)

# A prompt of 2 tokens and a response, in SmolLM2's vocabulary (the tiny models use it).
SEQUENCES = [[1, 504, 3437, 314, 260, 1789, 30], [1, 28, 29, 30, 31], [1, 9000, 12, 13]]


def run_verl(mode: str, payload: dict, **env: str) -> dict:
    """verl_check.py in verl's venv; its last stdout line is the JSON answer."""
    if not VERL_PYTHON.exists():
        pytest.fail(f"{VERL_PYTHON} is missing: `make verl-env` (or `make test`) builds it")
    done = subprocess.run(
        # -P: the script's folder (tests/support, which has an http.py) stays off sys.path
        [str(VERL_PYTHON), "-P", str(CHECK), mode, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env},
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def documented(name: str, hosts: dict[str, str]) -> list[str]:
    """The overrides of the config docs/integrations.md shows under `<!-- verl-config: name -->`,
    with its placeholder hosts replaced."""
    match = re.search(
        rf"<!-- verl-config: {name} -->\n```bash\n(.*?)```", DOCS.read_text(), re.DOTALL
    )
    assert match, f"docs/integrations.md has no verl config {name!r}"
    words = shlex.split(match.group(1).replace("\\\n", " "))
    assert words[:3] == ["python3", "-m", "verl.trainer.main_ppo"], words[:3]
    text = "\n".join(words[3:])
    for placeholder, url in hosts.items():
        text = text.replace(placeholder, url)
    assert "-host" not in text, text
    return text.splitlines()


@pytest.fixture(scope="module")
def code_server(tiny_student_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A second teacher (another policy) behind an API key, for multi-teacher routing."""
    teacher = _teacher(tiny_student_dir, tmp_path_factory, "verl-code", OPD_API_KEY=TEST_API_KEY)
    yield teacher.url
    teacher.stop()


@pytest.fixture(scope="module")
def configs(tiny_server: str, coalescing_server: str, code_server: str) -> dict[str, list[str]]:
    """The three documented configs; two replicas of the tiny teacher where a page lists two."""
    hosts = {
        "http://teacher-host-2:8001": coalescing_server,
        "http://teacher-host:8001": tiny_server,
        "http://math-host-2:8001": coalescing_server,
        "http://math-host:8001": tiny_server,
        "http://code-host:8001": code_server,
    }
    return {name: documented(name, hosts) for name in ("opd", "student-topk", "mopd")}


def test_verl_loads_the_plugin_through_its_entry_points():
    out = run_verl("plugin", {})
    assert out["loaded_by_entry_point"]
    assert out["replica"] == "opd.client.verl.replica.OpdReplica"
    assert out["loss_uses_topk"]
    modules = {f"opd.client.verl.{p.stem}" for p in (ROOT / "client" / "verl").glob("*.py")}
    assert set(out["imported"]) == modules - {"opd.client.verl.__init__"}


def test_the_documented_configs_compose_and_validate_in_verl(configs, tiny_server, code_server):
    out = run_verl("configs", {"configs": configs})
    opd, topk, mopd = out["opd"], out["student-topk"], out["mopd"]
    # one teacher: verl makes it the key "default", one replica (a pool of 1, tensor parallel 1)
    (single,) = opd["teachers"].values()
    assert single["engine"] == "opd" and single["num_replicas"] == 1
    assert len(single["urls"]) == 2 and single["urls"][0] == tiny_server
    assert (opd["loss_mode"], opd["use_topk"]) == ("k1", False)
    assert (topk["loss_mode"], topk["use_topk"], topk["topk"]) == ("opd_reverse_kl_topk", True, 16)
    assert topk["teachers"]["default"]["urls"] == [tiny_server]
    assert mopd["teacher_key"] == "data_source"
    assert set(mopd["teachers"]) == {"openai/gsm8k", "code_contests"}
    assert mopd["teachers"]["code_contests"]["urls"] == [code_server]
    assert all(t["engine"] == "opd" for t in mopd["teachers"].values())


def score(url: str, seq: list[int], top_k: int) -> object:
    with TeacherClient(url, api_key=TEST_API_KEY) as client:
        request = ScoreRequest(sequences=[SequenceIn(token_ids=seq, score_from=1)], top_k=top_k)
        return client.score(request).sequence(0)


def check_rows(row: dict, seq: list[int], k: int, url: str, reference: ReferenceModel) -> None:
    """verl's rows (one per token, row j about token j + 1, a zero row last) equal the teacher's
    /v1/score numbers and the float64 reference within ATOL. Not bit for bit: the replica's
    request carries one more token (the greedy next one is asked for), and a batch of
    another shape rounds float32 sums in another order."""
    ids, logps = np.array(row["ids"]), np.array(row["logprobs"])
    width = max(k, 1)
    assert ids.shape == logps.shape == (len(seq), width)
    assert row["padded"] == [1, 4 + len(seq), width]  # prompt left-padded to 4, as verl pads
    assert not ids[-1].any() and not logps[-1].any()
    scores = score(url, seq, k)
    ref = reference.reference(np.array(seq), 1)
    if k == 0:
        assert ids[:-1, 0].tolist() == seq[1:]
        np.testing.assert_allclose(logps[:-1, 0], scores.token_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(logps[:-1, 0], ref.token(np.array(seq[1:])), atol=ATOL, rtol=0)
    else:
        np.testing.assert_array_equal(ids[:-1], scores.top_k_ids)
        np.testing.assert_allclose(logps[:-1], scores.top_k_logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(logps[:-1], ref.top_values(k), atol=ATOL, rtol=0)
        np.testing.assert_allclose(ref.at(ids[:-1]), logps[:-1], atol=ATOL, rtol=0)


def test_verls_teacher_loop_scores_through_opd(
    configs, tiny_server, code_server, tiny_model_dir, tiny_student_dir
):
    keys = ["openai/gsm8k", "code_contests", "openai/gsm8k"]
    runs = [
        {"overrides": configs["mopd"], "sequences": SEQUENCES, "keys": keys},
        {"overrides": configs["student-topk"], "sequences": SEQUENCES[:2]},
    ]
    out = run_verl("teacher", {"runs": runs}, CODE_TEACHER_KEY=TEST_API_KEY)
    mopd, topk = out["runs"]
    math_ref, code_ref = ReferenceModel(tiny_model_dir), ReferenceModel(tiny_student_dir)
    # MOPD: each sample reached the teacher of its key (K = 0: the actual token's log-prob)
    for row, seq, key in zip(mopd["rows"], SEQUENCES, keys, strict=True):
        url, ref = (tiny_server, math_ref) if key == "openai/gsm8k" else (code_server, code_ref)
        check_rows(row, seq, 0, url, ref)
    assert set(mopd["addresses"]) == {"openai/gsm8k", "code_contests"}
    # the teacher's top-16 at every position, for the student-topk config's agent loop
    for row, seq in zip(topk["rows"], SEQUENCES[:2], strict=True):
        check_rows(row, seq, 16, tiny_server, math_ref)
    for run in (mopd, topk):
        assert "sampling_params.max_tokens: 4 > 1" in run["refused"]
        assert run["again"] == run["rows"][0]["ids"]


def test_student_topk_reverse_kl_through_verls_loss(configs, tiny_server, tiny_model_dir, tmp_path):
    """opd_reverse_kl_topk in verl's distillation_ppo_loss: the logits processor's per-token
    loss and masses, the gradient with respect to the student's logits and verl's token-mean
    loss, against KL(p_bar || q_bar) on the student's top-16 computed here in float64."""
    prompts = [[1, 504, 3437], [1, 28]]
    responses = [[314, 260, 1789, 30], [29, 30, 31]]
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    n_tokens, k = sum(map(len, sequences)), 16
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((1, n_tokens, 49152)) * 3).astype(np.float32)
    np.save(tmp_path / "logits.npy", logits)
    out = run_verl(
        "loss",
        {
            "overrides": configs["student-topk"],
            "prompts": prompts,
            "responses": responses,
            "logits": str(tmp_path / "logits.npy"),
            "out": str(tmp_path),
        },
    )
    assert (out["strategy"], out["loss_agg_mode"]) == ("fsdp", "token-mean")
    z = logits[0].astype(np.float64)
    logp = (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )
    order = np.argsort(-z, axis=1)
    gaps = np.take_along_axis(z, order[:, k - 1 : k + 1], axis=1)
    assert np.all(gaps[:, 0] - gaps[:, 1] > 1e-4)  # the top-16 is unambiguous in float32
    cand = order[:, :k]
    ref = ReferenceModel(tiny_model_dir)
    loss = np.zeros(n_tokens)
    grad = np.zeros_like(z)
    student_mass, teacher_mass = np.zeros(n_tokens), np.zeros(n_tokens)
    start = 0
    for prompt, seq in zip(prompts, sequences, strict=True):
        rows = np.arange(start + len(prompt) - 1, start + len(seq) - 1)  # predict the response
        teacher = ref.reference(np.array(seq), len(prompt)).at(cand[rows])
        request = ScoreRequest(
            sequences=[
                SequenceIn(token_ids=seq, score_from=len(prompt), candidate_ids=cand[rows].tolist())
            ]
        )
        with TeacherClient(tiny_server) as client:
            served = client.score(request)
        np.testing.assert_allclose(served.sequence(0).candidate_logprobs, teacher, atol=ATOL)
        s = np.take_along_axis(logp[rows], cand[rows], axis=1)
        log_pbar = s - np.log(np.exp(s).sum(-1, keepdims=True))
        log_qbar = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
        kl = (np.exp(log_pbar) * (log_pbar - log_qbar)).sum(-1)
        loss[rows] = kl
        student_mass[rows], teacher_mass[rows] = np.exp(s).sum(-1), np.exp(teacher).sum(-1)
        # d KL(p_bar || q_bar) / d z over the candidates: p_bar (log p_bar - log q_bar - KL)
        g = np.exp(log_pbar) * (log_pbar - log_qbar - kl[:, None])
        for i, r in enumerate(rows):
            grad[r, cand[r]] = g[i]
        start += len(seq)
    got = np.load(tmp_path / "distillation_losses.npy")[0]
    np.testing.assert_allclose(got, loss, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "student_mass.npy")[0], student_mass, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "teacher_mass.npy")[0], teacher_mass, atol=ATOL)
    np.testing.assert_allclose(np.load(tmp_path / "grad.npy")[0], grad, atol=ATOL, rtol=0)
    response_rows = loss[loss != 0]
    assert len(response_rows) == sum(map(len, responses))
    assert out["final_loss"] == pytest.approx(response_rows.mean(), abs=ATOL)
    assert out["metrics"]["distillation/loss"] == pytest.approx(out["final_loss"])
    assert out["metrics"]["distillation/teacher_mass"] == pytest.approx(
        teacher_mass[loss != 0].mean(), abs=ATOL
    )
