"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder `step_<N>/` holds the student (save_pretrained, safetensors; a LoRA
student's with its adapters merged, and the adapters in `adapter/`, a PEFT folder), the tokenizer,
optimizer.safetensors + optimizer.json (AdamW moments and param groups), rng.safetensors (the
torch RNG state of every rank) and state.json (step, data position, scheduler, Python and NumPy
RNG states, config).
Nothing is unpickled on load, so a checkpoint someone hands you cannot run code.

Crash safety: a folder named exactly `step_<N>` is always complete. It is written as
`step_<N>.tmp`, every file and folder is fsynced, then it is renamed into place and the parent
folder fsynced, so neither a SIGKILL nor a power cut can leave a half-written `step_<N>`.
A stale checkpoint is pruned by renaming it to `step_<N>.del` first, for the same reason.
Resume only considers `step_<N>` folders holding state.json (written last); the leftovers of a
killed writer (`.tmp`, `.old`, `.del`) are ignored and removed at the next save. A write that
fails (a full disk) raises CheckpointWriteError, removes its temporary folder and leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict, dict]:
    """An optimizer state dict (keys: parameter indices, or names under FSDP) as tensors +
    JSON; tensor keys are "<param>.<field>" (field names have no dots)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.rsplit(".", 1)
        state.setdefault(_param_key(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(_param_key(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _param_key(pid: str) -> int | str:
    return int(pid) if pid.isdigit() else pid


_COMPLETE = re.compile(r"step_(\d+)")
# What a writer leaves behind when it is killed: a checkpoint being written, one being
# replaced, one being pruned.
_LEFTOVER = re.compile(r"step_\d+\.(tmp|old|del)")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (ENOSPC, EFBIG, EIO, ...). Its message names the
    folder, the OS's reason and the checkpoint that is still intact; `errno` is the OS's."""


def checkpoint_step(folder: Path) -> int | None:
    """N of a complete checkpoint's folder `step_<N>`; None for anything else."""
    match = _COMPLETE.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints under RUN_DIR/checkpoints, oldest step first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        p
        for p in checkpoints_dir.iterdir()
        if checkpoint_step(p) is not None and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def save_checkpoint(
    folder: Path,
    *,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    rng_states: dict[str, torch.Tensor] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    adapter: Any = None,
) -> Path:
    """Write atomically and durably: into `<folder>.tmp`, fsync, then rename into place.
    model_state / optimizer_state replace the live objects' own state dicts (FSDP: the
    gathered full states; a LoRA student: the merged weights). adapter: a LoRA student's
    PeftModel, whose adapters go to `adapter/` as a standard PEFT folder. On failure the
    temporary folder is removed and CheckpointWriteError raised; the checkpoints already on
    disk are untouched."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(parent)  # a killed writer's, which would otherwise fill the disk
    previous = complete_checkpoints(parent)
    tmp = folder.with_name(folder.name + ".tmp")
    try:
        tmp.mkdir()
        _write_files(
            tmp,
            model=model,
            tokenizer=tokenizer,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state=trainer_state,
            rng_states=rng_states,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
        if adapter is not None:
            from opd.client.train.lora import ADAPTER_FOLDER, save_adapter

            save_adapter(adapter, tmp / ADAPTER_FOLDER)
        _fsync_tree(tmp)
        replaced = _move_into_place(tmp, folder)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(folder, exc, previous[-1] if previous else None) from exc
    _fsync_dir(parent)  # the rename itself survives a power cut
    if replaced is not None:
        shutil.rmtree(replaced)
    return folder


def _write_files(
    tmp: Path,
    *,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    rng_states: dict[str, torch.Tensor] | None,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
) -> None:
    """Every file of a checkpoint into `tmp`; state.json last, so that it marks completeness."""
    model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(tmp / "model")
    tensors, meta = _optimizer_to_files(optimizer_state or optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    rng = rng_states or {"torch_cpu_rank0": torch.get_rng_state()}
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    state = {
        **trainer_state,
        "scheduler": scheduler.state_dict(),
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy_rng": np.random.get_state(legacy=False),
    }
    (tmp / "state.json").write_text(json.dumps(state, default=_json_default))


def _move_into_place(tmp: Path, folder: Path) -> Path | None:
    """rename(2) is atomic, but a folder cannot be renamed over a non-empty one: a checkpoint
    of the same step (a run resumed from an earlier one) is moved aside first, and returned
    for the caller to delete. A crash in between leaves `step_<N>.old` and `.tmp`, both
    ignored: resume then takes the newest other checkpoint, which is intact."""
    if not folder.exists():
        tmp.rename(folder)
        return None
    old = folder.with_name(folder.name + ".old")
    folder.rename(old)
    try:
        tmp.rename(folder)
    except OSError:
        old.rename(folder)  # put the checkpoint that was there back
        raise
    return old


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder, bottom up: the data is on disk before the rename
    that publishes it (without this a power cut may persist the rename but not the data)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(folder: Path, exc: Exception, previous: Path | None) -> CheckpointWriteError:
    """One message with what a user needs: where, the OS's reason, and what is still safe.
    safetensors raises its own error type; its text carries the OS error ("os error 28")."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else f"{type(exc).__name__}: {exc}"
    kept = (
        f"the previous checkpoint {previous} is intact"
        if previous is not None
        else "there is no earlier checkpoint"
    )
    error = CheckpointWriteError(
        f"could not write checkpoint {folder}: {reason} ({exc}); its temporary folder was "
        f"removed and {kept}"
    )
    error.errno = code
    return error


def remove_leftovers(checkpoints_dir: Path) -> None:
    """Remove what a killed writer left (`step_<N>.tmp`, `.old`, `.del`). Rank 0 only: it is
    the only writer of a run's checkpoints."""
    for path in checkpoints_dir.iterdir():
        if _LEFTOVER.fullmatch(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints. Each older one is renamed to
    `step_<N>.del` before it is deleted, so a kill mid-delete never leaves a partial folder
    under a checkpoint's name (leftovers do not count toward `keep`)."""
    for stale in complete_checkpoints(checkpoints_dir)[:-keep]:
        doomed = stale.with_name(stale.name + ".del")
        stale.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_checkpoint(
    folder: Path,
    *,
    optimizer,
    scheduler,
    rank: int = 0,
    load_optimizer: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNGs in place; return the trainer state.
    (The model weights are loaded by the caller from folder / "model".) load_optimizer
    replaces optimizer.load_state_dict (FSDP: each rank keeps its shard)."""
    optim_state = _optimizer_from_files(
        load_file(str(folder / "optimizer.safetensors")),
        json.loads((folder / "optimizer.json").read_text()),
    )
    (load_optimizer or optimizer.load_state_dict)(optim_state)
    state = json.loads((folder / "state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(folder / "rng.safetensors"))
    key = f"torch_cpu_rank{rank}"
    if key not in rng:
        raise ValueError(
            f"{folder} holds RNG states for {len(rng)} rank(s); rank {rank} cannot resume "
            "exactly from it (resume with the same number of processes)"
        )
    torch.set_rng_state(rng[key])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy_rng"]
    np.random.set_state(np_state)
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step; a killed writer's leftovers are ignored."""
    found = complete_checkpoints(run_dir / "checkpoints")
    return found[-1] if found else None
