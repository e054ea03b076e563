"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder `step_<N>/` holds the student (save_pretrained, safetensors), the tokenizer,
optimizer.safetensors + optimizer.json (AdamW moments and param groups), rng.safetensors (the
torch RNG state of every rank) and state.json (step, data position, scheduler, Python and NumPy
RNG states, config).
Nothing is unpickled on load, so a checkpoint someone hands you cannot run code.
"""

from __future__ import annotations

import json
import random
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
) -> Path:
    """Write atomically: into a temporary sibling, then rename. model_state / optimizer_state
    replace the live objects' own state dicts (FSDP: the gathered full states)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
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
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


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
    folders = [
        p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and "tmp" not in p.name
    ]
    return max(folders, key=lambda p: int(p.name.split("_")[1]), default=None)
