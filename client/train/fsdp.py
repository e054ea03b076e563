"""FSDP2 for `opd train --fsdp` under torchrun: the student sharded across ranks.

    torchrun --nproc_per_node 8 -m opd.client.cli train --fsdp --student ... --teacher-url ...

Each decoder layer is its own FSDP unit (gathered for its forward and backward, resharded
after), and the StudentModule wrapping the model is the root unit that owns the embeddings, the
final norm and the LM head (tied or not, they stay in one unit). Data parallelism is as with DDP
(opd.client.train.distributed): every rank samples and scores its own prompts, and the loss is
the token mean over all ranks' tokens (FSDP averages gradients over ranks, as DDP does).

What needs whole tensors gathers them, collectively on every rank:
- the vllm rollout engine's weight sync (`full_model_state`, HF names);
- checkpoints (`full_model_state` with CPU offload, `full_optimizer_state`), written by rank 0
  in the same pickle-free format as unsharded runs (opd.client.train.checkpoint), so a run
  saved under FSDP resumes under FSDP or without it, and the student folder is a plain HF model.
"""

from __future__ import annotations

from typing import Any

import torch

from opd.client.train.student_math import StudentModule

_PREFIX = "model."  # StudentModule.model: the HF model's names start after it


def shard(student: StudentModule, device: str) -> StudentModule:
    """Shard in place: every decoder layer, then the root (returned for chaining)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(
        "cuda" if device.startswith("cuda") else "cpu", (torch.distributed.get_world_size(),)
    )
    for layer in student.model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    return student


def full_model_state(student: StudentModule, cpu_offload: bool = False) -> dict[str, Any]:
    """The student's whole state dict under HF names, on every rank (a collective call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    state = get_model_state_dict(student, options=options)
    return {k.removeprefix(_PREFIX): v for k, v in state.items()}


def full_optimizer_state(student: StudentModule, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name, on CPU (a collective call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(student, optimizer, options=options)


def load_full_optimizer_state(
    student: StudentModule, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Inverse of full_optimizer_state: every rank keeps its shard of each tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        student, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP: its full value)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
