"""The loggers of a run (`--logger`, repeatable): JSONL always, plus TensorBoard, Weights & Biases,
MLflow and Trackio, each behind the one `MetricLogger` interface (log(step, metrics), close()).

Why one interface: the trainer calls `log` once per step and `close` once, and never knows which
trackers are on. Each tracker here:
- imports its library only when it is built, so importing this module costs nothing and a
  missing library is a clear error at start (naming the package to install), not mid-run;
- records the run's config once at start (W&B config, MLflow params, Trackio config), with
  secrets (`api_key`, ...) masked;
- logs the numeric metrics of each step at that step number, NaN left out as TensorBoard does;
- writes under the run folder unless the user's own environment variables say otherwise
  (WANDB_MODE / WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR), so a run is one folder and a test
  or an air-gapped cluster needs no network;
- continues the same tracker run on `--resume` where the library allows: the ids are kept in
  RUN_DIR/loggers.json.

After start, a tracker's error while logging is reported once and then ignored: an outage of a
tracking server must not end hours of training, and metrics.jsonl (which the trainer writes
first, and which is never guarded) still has every step.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from opd.client.train.metric_log import (
    JsonlLogger,
    MetricLogger,
    MultiLogger,
    TensorBoardLogger,
    finite_json,
    scalars,
)

logger = logging.getLogger(__name__)

LoggerName = Literal["jsonl", "tensorboard", "wandb", "mlflow", "trackio"]
LOGGER_NAMES: tuple[str, ...] = get_args(LoggerName)
DEFAULT_LOGGERS: tuple[str, ...] = ("jsonl", "tensorboard")
STATE_FILE = "loggers.json"
PROJECT = "opd"

# The pip package that provides each tracker (the error message names it).
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}


class MissingLoggerPackage(ModuleNotFoundError):
    """A `--logger` whose library is not installed; the message says what to pip install."""


def build_loggers(
    names: Sequence[str],
    run_dir: Path,
    *,
    run_name: str,
    config: Mapping[str, Any],
    resume_step: int | None,
    project: str = PROJECT,
) -> MetricLogger:
    """The run's loggers as one `MetricLogger`.

    names: any of LOGGER_NAMES, in any order, repeats ignored; "jsonl" is always included (first)
    because resume checks and reports read metrics.jsonl. run_name names the tracker runs.
    config: the run's settings, JSON-like (TrainConfig.model_dump(mode="json")). resume_step:
    the checkpoint step a resumed run continues from, None for a fresh run (which starts every
    tracker run anew and empties metrics.jsonl, as before). project: the W&B project, MLflow
    experiment and Trackio project, unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise.
    """
    unknown = sorted(set(names) - set(LOGGER_NAMES))
    if unknown:
        raise ValueError(f"unknown logger(s) {unknown}; choose from {list(LOGGER_NAMES)}")
    wanted = [n for n in LOGGER_NAMES if n == "jsonl" or n in names]
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed = resume_step is not None
    safe_config = redact(dict(config))
    state_path = run_dir / STATE_FILE
    old_state = _read_state(state_path) if resumed else {}
    new_state: dict[str, dict[str, Any]] = {}

    built: list[MetricLogger] = []
    try:
        for name in wanted:
            if name == "jsonl":
                truncate = resume_step if resumed else 0
                built.append(JsonlLogger(run_dir / "metrics.jsonl", truncate_after_step=truncate))
            elif name == "tensorboard":
                purge = resume_step + 1 if resume_step is not None else 0
                tb = TensorBoardLogger(
                    run_dir / "tensorboard", purge_step=purge, config=safe_config
                )
                built.append(_Guarded(name, tb))
            else:
                opened = TrackerRun(run_dir, run_name, safe_config, project, old_state.get(name))
                tracker = TRACKERS[name](opened)
                new_state[name] = tracker.state
                built.append(_Guarded(name, tracker))
    except BaseException:
        # One tracker failed to start: finish the ones already started (a W&B or MLflow run
        # left open would show as running forever) before the error ends the run.
        for done in reversed(built):
            try:
                done.close()
            except Exception:  # the original error is the one to report
                logger.debug("closing a logger after a failed start", exc_info=True)
        raise
    if new_state:
        # A resume keeps the ids of trackers not on this time: a later resume that turns one
        # back on continues its run.
        _write_state(state_path, {**old_state, **new_state})
    elif not resumed:
        # A fresh run with no tracker: ids left by an earlier run in this folder must not be
        # continued by a later resume.
        state_path.unlink(missing_ok=True)
    return MultiLogger(*built)


@dataclass(frozen=True)
class TrackerRun:
    """What every tracker is opened with: where the run lives, its name and config, the
    project, and the ids a previous attempt kept in loggers.json (None: a fresh run)."""

    run_dir: Path
    run_name: str
    config: dict[str, Any]
    project: str = PROJECT
    state: Mapping[str, Any] | None = None


# ---- Weights & Biases ---------------------------------------------------------------------------


class WandbLogger:
    """A W&B run. Offline, in RUN_DIR/wandb/, unless WANDB_MODE (and WANDB_DIR) are set: an
    offline run is uploaded later with `wandb sync RUN_DIR/wandb/offline-run-*`.

    Resume: the run id is kept in loggers.json and the run is re-opened with resume="allow".
    W&B keeps steps increasing, so steps the interrupted attempt had already logged past the
    checkpoint keep their first values there (online, they are skipped here rather than sent to
    be dropped with a warning); the redone values are in metrics.jsonl."""

    def __init__(self, opened: TrackerRun) -> None:
        run_dir, run_name, config = opened.run_dir, opened.run_name, opened.config
        project, state = opened.project, opened.state
        wandb = _import("wandb", PACKAGES["wandb"])
        resumed = bool(state and state.get("id"))
        run_id = str(state["id"]) if state and resumed else None  # None: W&B makes one
        if state and resumed and state.get("project"):
            project = str(state["project"])
        kwargs: dict[str, Any] = {}
        if "WANDB_MODE" not in os.environ:
            kwargs["mode"] = "offline"
        if "WANDB_DIR" not in os.environ:
            kwargs["dir"] = str(run_dir)
        if "WANDB_NAME" not in os.environ:
            kwargs["name"] = run_name
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or project,
            id=run_id,
            config=config,
            resume="allow" if resumed else None,
            allow_val_change=resumed,
            # our own run object, independent of any wandb.run the user's code started
            reinit="create_new",
            **kwargs,
        )
        # Online, a resumed run knows its next step; offline it starts at 0 (sync sorts it out).
        self._first_step = int(self._run.step or 0) if resumed else 0
        self.state = {"id": self._run.id, "project": self._run.project}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        values = scalars(metrics)
        if values and step >= self._first_step:
            self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


# ---- MLflow -------------------------------------------------------------------------------------


class MlflowLogger:
    """An MLflow run, through MlflowClient (no global active run to leak into user code).

    Tracking store: MLFLOW_TRACKING_URI if set, else SQLite in RUN_DIR/mlflow.db (MLflow 3 keeps
    its file store, ./mlruns, in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE
    is set, so the local default is its SQLite store; view it with
    `mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`). The config goes in as params:
    flattened (`a.b`), keys and values cut to MLflow's limits. Metric names keep only the
    characters MLflow allows (`kl@depth0-1023` -> `kl_depth0-1023`).

    Resume: the run id and tracking URI are kept in loggers.json; the same run is re-opened
    (status back to RUNNING). Params are immutable in MLflow, so only new keys are added. A
    redone step is appended to the metric's history (MLflow keeps every value logged at a step).
    """

    def __init__(self, opened: TrackerRun) -> None:
        run_dir, run_name, config = opened.run_dir, opened.run_name, opened.config
        project, state = opened.project, opened.state
        _import("mlflow", PACKAGES["mlflow"])
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        self._finished = RunStatus.to_string(RunStatus.FINISHED)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = not uri
        if local:
            db = (Path(run_dir) / "mlflow.db").resolve()
            uri = f"sqlite:///{db}"
            _import("sqlalchemy", "sqlalchemy alembic", what="MLflow's local SQLite store")
            _import("alembic", "sqlalchemy alembic", what="MLflow's local SQLite store")
        self._client = MlflowClient(tracking_uri=uri)
        self.run_id = self._reopen(state, uri)
        existing: dict[str, str] = {}
        if self.run_id is not None:
            self._client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            existing = dict(self._client.get_run(self.run_id).data.params)
        else:
            experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID") or self._experiment(
                os.environ.get("MLFLOW_EXPERIMENT_NAME") or project,
                (Path(run_dir) / "mlartifacts").resolve().as_uri() if local else None,
            )
            run = self._client.create_run(experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in mlflow_params(config).items() if k not in existing]
        for chunk in _chunks(params, _mlflow_limit("MAX_PARAMS_TAGS_PER_BATCH", 100)):
            self._client.log_batch(self.run_id, params=chunk)
        self.state = {"run_id": self.run_id, "tracking_uri": uri}

    def _reopen(self, state: Mapping[str, Any] | None, uri: str) -> str | None:
        """The stored run, if this resume logs to the same store and the run is still there."""
        if not state or state.get("tracking_uri") != uri or not state.get("run_id"):
            return None
        try:
            return self._client.get_run(str(state["run_id"])).info.run_id
        except Exception:  # deleted or unreachable: start a new run instead
            logger.warning("mlflow: run %s not found in %s; starting a new run", state, uri)
            return None

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self._client.create_experiment(name, artifact_location=artifact_location)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [
            self._Metric(mlflow_name(key), value, now, step)
            for key, value in scalars(metrics).items()
        ]
        for chunk in _chunks(batch, _mlflow_limit("MAX_METRICS_PER_BATCH", 1000)):
            self._client.log_batch(self.run_id, metrics=chunk)

    def close(self) -> None:
        self._client.set_terminated(self.run_id, status=self._finished)


def mlflow_name(key: str) -> str:
    """A metric or param name MLflow accepts: characters outside `[/\\w.\\- :]` -> `_`, no empty,
    `.` or `..` path parts (MLflow refuses names that are not normalized paths), at most 250."""
    name = re.sub(r"[^/\w.\- :]", "_", key)
    name = "/".join(part for part in name.split("/") if part not in ("", ".", ".."))
    return (name or "_")[: _mlflow_limit("MAX_ENTITY_KEY_LENGTH", 250)]


def mlflow_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The config as MLflow params: nested keys joined with '.', values as strings (lists and
    None as JSON), each cut to MLflow's length limits (250 for keys, 6000 for values)."""
    limit = _mlflow_limit("MAX_PARAM_VAL_LENGTH", 6000)
    out: dict[str, str] = {}
    for key, value in _flatten(config):
        text = value if isinstance(value, str) else json.dumps(finite_json(value), default=str)
        out[mlflow_name(key)] = text[:limit]
    return out


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in obj.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _mlflow_limit(name: str, default: int) -> int:
    """MLflow's own limit where this version has it (mlflow.utils.validation)."""
    try:
        from mlflow.utils import validation
    except ImportError:
        return default
    return int(getattr(validation, name, default))


# ---- Trackio ------------------------------------------------------------------------------------


class TrackioLogger:
    """A Trackio run, stored locally in RUN_DIR/trackio/ (a SQLite file per project) unless
    TRACKIO_DIR is set; view it with `TRACKIO_DIR=RUN_DIR/trackio trackio show --project opd`.
    TRACKIO_SPACE_ID or TRACKIO_SERVER_URL (Trackio's own variables) send it to a Hugging Face
    Space or a self-hosted server instead.

    Trackio reads TRACKIO_DIR once, when it is first imported (trackio.utils.TRACKIO_DIR, copied
    into the modules that use it), so the folder is set then, and re-pointed if trackio was
    already imported for another folder.

    Resume: Trackio resumes runs by name within a project (resume="allow"); the name is kept in
    loggers.json. A redone step is appended (both values stay in its store)."""

    def __init__(self, opened: TrackerRun) -> None:
        run_dir, run_name, config = opened.run_dir, opened.run_name, opened.config
        project, state = opened.project, opened.state
        user_dir = os.environ.get("TRACKIO_DIR")
        self.directory = Path(user_dir) if user_dir else (Path(run_dir) / "trackio").resolve()
        trackio = _import_trackio(None if user_dir else self.directory)
        resumed = bool(state and state.get("name"))
        if state and resumed:
            project = str(state.get("project") or project)
            run_name = str(state["name"])
        self._run = trackio.init(
            project=project,
            name=run_name,
            config=config,
            resume="allow" if resumed else "never",
            embed=False,
        )
        self.state = {
            "project": project,
            "name": self._run.name,
            "id": getattr(self._run, "id", None),
        }

    def log(self, step: int, metrics: dict[str, float]) -> None:
        values = scalars(metrics)
        if values:
            self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


_TRACKIO_PATHS = ("TRACKIO_DIR", "MEDIA_DIR", "ARTIFACTS_DIR")


def _import_trackio(directory: Path | None) -> Any:
    """trackio, writing under `directory` (None: wherever its own TRACKIO_DIR/HF_HOME say)."""
    if directory is None or "trackio" in sys.modules:
        trackio = _import("trackio", PACKAGES["trackio"])
    else:
        # TRACKIO_DIR is read at import: set it for the import only, leave the env as it was.
        saved = os.environ.get("TRACKIO_DIR")
        os.environ["TRACKIO_DIR"] = str(directory)
        try:
            trackio = _import("trackio", PACKAGES["trackio"])
        finally:
            if saved is None:
                os.environ.pop("TRACKIO_DIR", None)
            else:
                os.environ["TRACKIO_DIR"] = saved
    if directory is not None:
        _point_trackio_at(directory)
    return trackio


def _point_trackio_at(directory: Path) -> None:
    """Re-point an imported trackio at `directory`: every trackio module holds its own copy of
    the import-time paths, so each copy equal to the old value is replaced."""
    utils = sys.modules["trackio.utils"]
    current = Path(utils.TRACKIO_DIR)
    if current == directory:
        return
    old = {name: getattr(utils, name) for name in _TRACKIO_PATHS if hasattr(utils, name)}
    new = {
        name: directory if name == "TRACKIO_DIR" else directory / Path(value).relative_to(current)
        for name, value in old.items()
    }
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "trackio" or module_name.startswith("trackio.")):
            continue
        for name, value in old.items():
            if getattr(module, name, None) == value:
                setattr(module, name, new[name])
    storage = sys.modules.get("trackio.sqlite_storage")
    if storage is not None:
        where = storage.SQLiteStorage.get_project_db_path(PROJECT).parent
        if where != directory:
            logger.warning("trackio writes to %s, not %s (could not re-point it)", where, directory)


# The trackers by --logger name; each is opened with a TrackerRun and exposes .state, the ids
# kept in loggers.json for a resume.
TRACKERS: dict[str, Any] = {"wandb": WandbLogger, "mlflow": MlflowLogger, "trackio": TrackioLogger}


# ---- shared helpers -----------------------------------------------------------------------------


class _Guarded:
    """A tracker whose errors after start are logged (the first with its traceback, then a
    count at close) instead of raised: see the module docstring for why."""

    def __init__(self, name: str, inner: MetricLogger) -> None:
        self.name = name
        self.inner = inner
        self.failures = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        try:
            self.inner.log(step, metrics)
        except Exception:  # a tracker outage must not stop training
            self.failures += 1
            if self.failures == 1:
                logger.warning(
                    "logger %s failed at step %d; ignoring its errors from now on "
                    "(metrics.jsonl still has every step)",
                    self.name,
                    step,
                    exc_info=True,
                )

    def close(self) -> None:
        if self.failures:
            logger.warning("logger %s failed on %d step(s)", self.name, self.failures)
        try:
            self.inner.close()
        except Exception:  # as for log
            logger.warning("logger %s failed to close", self.name, exc_info=True)


# Leaf keys whose values are secrets, masked before a config leaves the machine. `_token` but
# not `_tokens` (max_new_tokens is a setting, hf_token a secret).
_SECRET = re.compile(r"(api_?key|secret|password|passwd|credentials?|(^|_)token)$", re.I)
MASK = "***"


def redact(config: Any) -> Any:
    """The config with secret-looking values (api_key, *_token, password, ...) masked, so a
    tracker (often a hosted service) never receives the teacher's API key."""
    if isinstance(config, Mapping):
        return {
            k: (MASK if _SECRET.search(str(k)) and v not in (None, "") else redact(v))
            for k, v in config.items()
        }
    if isinstance(config, list | tuple):
        return [redact(v) for v in config]
    return config


def _import(module: str, package: str, *, what: str | None = None) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingLoggerPackage(
            f"{what or f'--logger {module}'} needs the {module!r} library, which is not "
            f"installed (or failed to import: {e}); install it with: pip install {package}"
        ) from e


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _read_state(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("%s unreadable; trackers start new runs", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(path: Path, state: dict[str, dict[str, Any]]) -> None:
    """Atomically (write + rename): a crash mid-write must not lose the ids of the runs."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)
