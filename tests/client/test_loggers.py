"""The run's loggers (client/train/loggers.py), each tested as the installed library in its
offline / local-file mode: a few steps with a NaN among them are logged, the logger is closed, and
what the library wrote is read back with the library's own reader, values and steps checked.
Then a resume: the same tracker run continues where the library allows.

Nothing leaves the machine: W&B runs offline (our default; WANDB_BASE_URL points at a closed
loopback port in case anything tried to go online), MLflow writes SQLite in the run folder with
telemetry off, Trackio writes its local SQLite store with the Hub offline.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opd.client.train import loggers as lg
from opd.client.train.loggers import MissingLoggerPackage, build_loggers, mlflow_params, redact
from opd.client.train.metric_log import read_metrics
from tests.support.fresh_import import heavy_modules_loaded

NAN = float("nan")
CONFIG = {
    "student": "tiny",
    "lr": 1e-6,
    "api_key": "sk-secret",
    "max_new_tokens": 256,
    "teachers": {"math": {"url": "http://t:8000", "weight": 2.0}},
    "adam_betas": [0.9, 0.999],
    "eval_set": None,
}


def step_metrics(step: int, attempt: int = 0) -> dict[str, float]:
    """What a step logs; a redone step (attempt 1) logs other values, so a test can tell the
    interrupted attempt's values from the redone ones."""
    return {
        "train/loss": 1.0 / step + 10 * attempt,
        "kl/sampled@depth0-1023": 0.1 * step,  # '@' is not allowed in MLflow names
        "probe/auroc": NAN if step == 2 else 0.5 + 0.01 * step,
    }


def expected(steps: range, attempt: int = 0) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] of the finite values logged over `steps`."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step in steps:
        for key, value in step_metrics(step, attempt).items():
            if not math.isnan(value):
                out.setdefault(key, []).append((step, value))
    return out


def run_steps(
    names: list[str], run_dir: Path, steps: range, *, resume_step: int | None, attempt: int = 0
) -> None:
    metrics = build_loggers(
        names, run_dir, run_name="run-a", config=CONFIG, resume_step=resume_step
    )
    for step in steps:
        metrics.log(step, step_metrics(step, attempt))
    metrics.close()


@pytest.fixture(scope="module", autouse=True)
def local_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every tracker in its local mode, its user-level folders in a temporary home. Module-wide
    because W&B and Trackio keep process-wide state set up on first use."""
    home = tmp_path_factory.mktemp("tracker-home")
    with pytest.MonkeyPatch.context() as mp:
        for var in (
            "WANDB_MODE",
            "WANDB_DIR",
            "WANDB_PROJECT",
            "WANDB_NAME",
            "WANDB_RUN_ID",
            "WANDB_RESUME",
            "WANDB_ENTITY",
            "WANDB_API_KEY",
            "MLFLOW_TRACKING_URI",
            "MLFLOW_EXPERIMENT_NAME",
            "MLFLOW_EXPERIMENT_ID",
            "TRACKIO_DIR",
            "TRACKIO_SPACE_ID",
            "TRACKIO_SERVER_URL",
            "TRACKIO_DATASET_ID",
            "TRACKIO_BUCKET_ID",
        ):
            mp.delenv(var, raising=False)
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "HF_HOME"):
            mp.setenv(var, str(home / var.lower()))
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("DO_NOT_TRACK", "true")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "loggers.json").read_text())


# ---- build_loggers ------------------------------------------------------------------------------


def test_jsonl_is_always_on_and_unknown_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "loggers.json").write_text('{"wandb": {"id": "from-an-earlier-run"}}')
    run_steps([], tmp_path, range(1, 4), resume_step=None)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["probe/auroc"] is None  # JSONL keeps the key, as null
    # a fresh run with no tracker: no ids to keep, and none from an earlier run to continue
    assert not (tmp_path / "loggers.json").exists()
    run_steps(["jsonl"], tmp_path, range(3, 5), resume_step=2, attempt=1)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        (1, 1.0),
        (2, 0.5),
        (3, 10 + 1 / 3),
        (4, 10.25),
    ]
    with pytest.raises(ValueError, match="comet"):
        build_loggers(["jsonl", "comet"], tmp_path, run_name="r", config={}, resume_step=None)


def test_config_secrets_are_masked_and_params_fit_mlflow_limits() -> None:
    masked = redact({"api_key": "k", "hf_token": "t", "max_new_tokens": 8, "x": {"password": 1}})
    assert masked == {
        "api_key": "***",
        "hf_token": "***",
        "max_new_tokens": 8,
        "x": {"password": "***"},
    }
    assert redact({"api_key": None}) == {"api_key": None}  # nothing to hide

    params = mlflow_params({"a": {"b": 1, "c@d": [1, 2]}, "long": "x" * 7000, "k" * 300: True})
    assert params["a.b"] == "1" and params["a.c_d"] == "[1, 2]"
    assert len(params["long"]) == 6000  # MLflow's MAX_PARAM_VAL_LENGTH
    assert "k" * 250 in params and params["k" * 250] == "true"  # key cut to 250


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [
        ("wandb", "wandb", "wandb"),
        ("mlflow", "mlflow", "mlflow-skinny"),
        ("trackio", "trackio", "trackio"),
    ],
)
def test_a_missing_library_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import of `module` now fails
    with pytest.raises(MissingLoggerPackage, match=f"pip install {package}"):
        build_loggers([name], tmp_path, run_name="r", config={}, resume_step=None)


def test_a_failing_tracker_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def log(self, step: int, metrics: dict[str, float]) -> None:
            raise ConnectionError("tracking server down")

        def close(self) -> None:
            raise ConnectionError("still down")

    guarded = lg._Guarded("broken", Broken())
    guarded.log(1, {"a": 1.0})
    guarded.log(2, {"a": 1.0})
    guarded.close()
    assert guarded.failures == 2
    warnings = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len([r for r in warnings if r.exc_info]) == 2  # first log failure, close failure


def test_light_import() -> None:
    """Importing the loggers pulls none of the trackers (nor torch): each is imported when its
    logger is built. A fresh interpreter is the only place that can be seen."""
    heavy = ("torch", "tensorboard", "wandb", "mlflow", "trackio", "sqlalchemy")
    code = "import opd.client.train.loggers, opd.client.train.metric_log"
    assert heavy_modules_loaded(code, heavy) == []


# ---- TensorBoard --------------------------------------------------------------------------------


def approx_points(points: list[tuple[int, float]]) -> list[tuple[int, object]]:
    """Points read back, sorted by (step, value) as `expected`/`merged` are, values approximate
    (a library may store float32)."""
    return [(step, pytest.approx(value)) for step, value in sorted(points)]


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {
        tag: approx_points([(e.step, e.value) for e in acc.Scalars(tag)])
        for tag in acc.Tags()["scalars"]
    }


def test_tensorboard_and_resume_purges_redone_steps(tmp_path: Path) -> None:
    run_steps(["tensorboard"], tmp_path, range(1, 5), resume_step=None)
    assert tensorboard_scalars(tmp_path) == expected(range(1, 5))
    # interrupted after step 4, resumed from the checkpoint of step 2: 3 and 4 are redone
    run_steps(["tensorboard"], tmp_path, range(3, 6), resume_step=2, attempt=1)
    want = expected(range(1, 3))
    for key, points in expected(range(3, 6), attempt=1).items():
        want.setdefault(key, []).extend(points)
    assert tensorboard_scalars(tmp_path) == want
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        (s, step_metrics(s, int(s > 2))["train/loss"]) for s in range(1, 6)
    ]


# ---- Weights & Biases ---------------------------------------------------------------------------


def wandb_runs(run_dir: Path) -> list[list[dict]]:
    """The records of each offline run folder under run_dir/wandb, oldest first, read by W&B's own
    reader of .wandb transaction logs (`wandb leet inspect --json`, which runs the wandb-core
    binary: the Python reader of older versions, wandb.sdk.internal.datastore, is gone, and the
    public API needs a server)."""
    runs = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        out = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            env=os.environ,
        )
        runs.append([json.loads(line) for line in out.stdout.splitlines() if line.strip()])
    return runs


def wandb_history(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record["type"] != "history":
            continue
        item = record["history"]["item"]
        for key, value in item.items():
            if not key.startswith("_"):
                out.setdefault(key, []).append((int(item["_step"]), value))
    return {key: approx_points(points) for key, points in out.items()}


def wandb_config(records: list[dict]) -> dict:
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    return run["config"]["update"]


def next_second() -> None:
    """W&B names an offline run folder by start second and run id: a resume within the same
    second as the first start would reuse its folder (a real restart takes longer)."""
    time.sleep(1.02 - time.time() % 1.0)


def test_wandb_offline_run_and_resume(tmp_path: Path) -> None:
    run_steps(["wandb"], tmp_path, range(1, 5), resume_step=None)
    (first,) = wandb_runs(tmp_path)
    assert wandb_history(first) == expected(range(1, 5))
    config = wandb_config(first)
    assert config["lr"] == 1e-6 and config["teachers"] == {
        "math": {"url": "http://t:8000", "weight": 2.0}
    }
    assert config["api_key"] == "***"
    run_id = state(tmp_path)["wandb"]["id"]
    assert (tmp_path / "wandb").is_dir()

    next_second()
    run_steps(["wandb"], tmp_path, range(3, 6), resume_step=2, attempt=1)
    assert state(tmp_path)["wandb"]["id"] == run_id
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2  # offline: one folder per attempt, same run id; `wandb sync` joins them
    for records in runs:
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert run["run_id"] == run_id and run["display_name"] == "run-a"
    assert wandb_history(runs[1]) == expected(range(3, 6), attempt=1)


# ---- MLflow -------------------------------------------------------------------------------------


def mlflow_history(run_dir: Path) -> tuple[object, dict[str, list[tuple[int, float]]], object]:
    from mlflow.tracking import MlflowClient

    ids = state(run_dir)["mlflow"]
    assert ids["tracking_uri"] == f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    history = {
        key: approx_points(
            [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        )
        for key in run.data.metrics
    }
    return run, history, client


def merged(*parts: dict[str, list[tuple[int, float]]], rename=lambda key: key) -> dict:
    """The union of several expected histories, each metric's points sorted by (step, value)."""
    out: dict[str, list] = {}
    for part in parts:
        for key, points in part.items():
            out.setdefault(rename(key), []).extend(points)
    return {key: sorted(points) for key, points in out.items()}


def mlflow_expected(*parts: dict[str, list[tuple[int, float]]]) -> dict:
    return merged(*parts, rename=lg.mlflow_name)


def test_mlflow_local_run_and_resume(tmp_path: Path) -> None:
    run_steps(["mlflow"], tmp_path, range(1, 5), resume_step=None)
    run, history, _ = mlflow_history(tmp_path)
    assert history == mlflow_expected(expected(range(1, 5)))
    assert "kl/sampled_depth0-1023" in history
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    params = run.data.params
    assert params["lr"] == "1e-06" and params["teachers.math.url"] == "http://t:8000"
    assert params["adam_betas"] == "[0.9, 0.999]" and params["api_key"] == "***"

    run_steps(["mlflow"], tmp_path, range(3, 6), resume_step=2, attempt=1)
    resumed, history, client = mlflow_history(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    # MLflow keeps every value logged at a step: 3 and 4 have the first attempt's and the redone
    assert history == mlflow_expected(expected(range(1, 5)), expected(range(3, 6), attempt=1))
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_tracker_that_fails_to_start_closes_those_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "trackio", None)
    with pytest.raises(MissingLoggerPackage):
        build_loggers(["mlflow", "trackio"], tmp_path, run_name="r", config={}, resume_step=None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "opd"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"  # not left RUNNING
    assert not (tmp_path / "loggers.json").exists()


# ---- Trackio ------------------------------------------------------------------------------------


def trackio_history(run_dir: Path) -> tuple[list, dict[str, list[tuple[int, float]]]]:
    """Runs of project "opd" and the latest run's metrics, through trackio's own readers."""
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_project_db_path("opd") == run_dir.resolve() / "trackio" / "opd.db"
    runs = list(trackio.Api().runs("opd"))
    (run_id,) = {r.id for r in runs}
    history: dict[str, list] = {}
    for key in SQLiteStorage.get_all_metrics_for_run("opd", run_id=run_id):
        values = SQLiteStorage.get_metric_values("opd", None, key, run_id=run_id)
        history[key] = approx_points([(v["step"], v["value"]) for v in values])
    return runs, history


def test_trackio_local_run_and_resume(tmp_path: Path) -> None:
    run_steps(["trackio"], tmp_path, range(1, 5), resume_step=None)
    assert (tmp_path / "trackio" / "opd.db").is_file()
    runs, history = trackio_history(tmp_path)
    assert history == expected(range(1, 5))
    (run,) = runs
    assert run.name == "run-a"
    assert run.config["lr"] == 1e-6 and run.config["api_key"] == "***"
    assert "TRACKIO_DIR" not in os.environ  # set for trackio's import only

    run_steps(["trackio"], tmp_path, range(3, 6), resume_step=2, attempt=1)
    runs, history = trackio_history(tmp_path)
    assert [r.id for r in runs] == [state(tmp_path)["trackio"]["id"]]  # the same run continued
    # a redone step is appended: 3 and 4 have the first attempt's values and the redone ones
    assert history == merged(expected(range(1, 5)), expected(range(3, 6), attempt=1))


def test_all_trackers_together(tmp_path: Path) -> None:
    """The trainer's path: several trackers in one build, one loggers.json for them all."""
    next_second()
    run_steps(
        ["trackio", "mlflow", "wandb", "tensorboard"], tmp_path, range(1, 4), resume_step=None
    )
    assert set(state(tmp_path)) == {"wandb", "mlflow", "trackio"}
    assert tensorboard_scalars(tmp_path) == expected(range(1, 4))
    (records,) = wandb_runs(tmp_path)
    assert wandb_history(records) == expected(range(1, 4))
    _, history, _ = mlflow_history(tmp_path)
    assert history == mlflow_expected(expected(range(1, 4)))
    _, history = trackio_history(tmp_path)
    assert history == expected(range(1, 4))
