"""Runs inside verl's venv (.venv-verl): verl's own code with opd's plugin installed, driven by
tests/verl/test_verl.py, which starts the opd servers from the main venv and checks every
number this prints (one JSON object on the last line of stdout).

    python verl_check.py plugin '{}'
    python verl_check.py configs '{"configs": {"name": [override, ...], ...}}'
    python verl_check.py teacher '{"runs": [{"overrides": [...], "sequences": [...],
                                             "keys": [...]}, ...]}'
    python verl_check.py loss '{"overrides": [...], "prompts": [...], "responses": [...],
                                "logits": "in.npy", "out": "dir"}'

Nothing of opd is imported before `import verl`: the plugin must arrive through verl's entry
points, as it does in a user's run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

# The overrides every check adds to the documented ones: a CPU machine, no GPU for the pool.
STUDENT = [
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
]


def compose(overrides: list[str]) -> Any:
    """verl's trainer config (ppo_trainer.yaml) with `overrides`, as `main_ppo` composes it."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=[*STUDENT, *overrides])


def plugin(_: dict) -> dict:
    import verl  # noqa: F401 - loads the `verl.plugins` entry points

    loaded = "opd.client.verl.plugin" in sys.modules
    from verl.trainer.distillation.losses import get_distillation_loss_settings
    from verl.workers.rollout.replica import get_rollout_replica_class

    replica = get_rollout_replica_class("opd")
    import importlib
    import pkgutil

    import opd.client.verl as package

    names = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    for name in names:
        importlib.import_module(name)
    return {
        "loaded_by_entry_point": loaded,
        "replica": f"{replica.__module__}.{replica.__qualname__}",
        "loss_uses_topk": get_distillation_loss_settings("opd_reverse_kl_topk").use_topk,
        "imported": names,
    }


def _ray() -> None:
    import ray

    # Logical CPUs: each teacher pool's placement group holds one per replica (verl's bundles),
    # and the pools of every run stay placed until the process ends.
    ray.init(num_cpus=16, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


def configs(args: dict) -> dict:
    """Each named override list composed and validated as `main_ppo` does it (verl's config
    classes, with opd's plugin loaded), and what the opd replicas would read from it."""
    import verl  # noqa: F401
    from verl.utils.config import omega_conf_to_dataclass

    from opd.client.verl.settings import read_settings

    out = {}
    for name, overrides in args["configs"].items():
        distillation = omega_conf_to_dataclass(compose(overrides).distillation)
        loss_config = distillation.distillation_loss
        out[name] = {
            "loss_mode": loss_config.loss_mode,
            "use_topk": loss_config.loss_settings.use_topk,
            "topk": loss_config.topk,
            "teacher_key": distillation.teacher_key,
            "teachers": {
                key: {
                    "engine": t.inference.name,
                    "num_replicas": t.num_replicas,
                    "urls": list(read_settings(t.inference.engine_kwargs, t.model_path).urls),
                }
                for key, t in distillation.teacher_models.items()
            },
        }
    return out


def teacher(args: dict) -> dict:
    """verl's teacher loop end to end, once per run in one Ray session:
    MultiTeacherModelManager launches the replicas the config names (opd's, through verl's
    registry), AsyncTeacherLLMServerManager routes each sequence by its key and returns what
    the agent loop pads into the batch."""
    import ray
    import verl  # noqa: F401

    _ray()
    try:
        return {"runs": [_teacher_run(run) for run in args["runs"]]}
    finally:
        # the replicas' actors go now, their connections to the teachers with them (a server
        # being stopped waits for open connections to close)
        ray.shutdown()


def _teacher_run(args: dict) -> dict:
    from verl.experimental.teacher_loop import MultiTeacherModelManager
    from verl.experimental.teacher_loop.teacher_manager import (
        AsyncTeacherLLMServerManager,
        _pad_teacher_outputs,
    )
    from verl.single_controller.ray.base import RayResourcePool
    from verl.utils.config import omega_conf_to_dataclass

    config = compose(args["overrides"])
    distillation = omega_conf_to_dataclass(config.distillation)
    pool = RayResourcePool(
        process_on_nodes=[distillation.n_gpus_per_node] * distillation.nnodes,
        use_gpu=False,
        max_colocate_count=1,
    )
    manager = MultiTeacherModelManager(config, pool)
    clients = manager.get_client()
    teachers = AsyncTeacherLLMServerManager(config, clients)
    keys = args.get("keys") or [None] * len(args["sequences"])

    async def run() -> dict:
        rows = []
        for seq, key in zip(args["sequences"], keys, strict=True):
            ids, logps = await teachers.compute_teacher_logprobs_single(
                sequence_ids=seq, routing_key=key
            )
            # as the agent loop pads one sample (a prompt of 2 tokens, the rest response)
            padded, _ = _pad_teacher_outputs(
                ids,
                logps,
                prompt_width=4,
                response_width=len(seq),
                prompt_length=2,
                response_length=len(seq) - 2,
                pad_token_id=0,
            )
            rows.append(
                {"ids": ids.tolist(), "logprobs": logps.tolist(), "padded": list(padded.shape)}
            )
        # a call the replica cannot answer, through verl's own client: refused with the field
        client = next(iter(clients.values()))
        try:
            await client.generate(
                uuid.uuid4().hex,
                prompt_ids=args["sequences"][0],
                sampling_params={"max_tokens": 4, "prompt_logprobs": 0},
            )
            refused = None
        except Exception as exc:  # noqa: BLE001 - Ray wraps the replica's ValueError
            refused = str(exc)
        try:  # a multimodal call: opd's replica scores token ids only
            await client.generate(
                uuid.uuid4().hex,
                prompt_ids=args["sequences"][0],
                sampling_params={"max_tokens": 1, "prompt_logprobs": 0},
                image_data=["an image"],
            )
            refused_media = None
        except Exception as exc:  # noqa: BLE001
            refused_media = str(exc)
        # and the replica answers the next call
        again, _ = await teachers.compute_teacher_logprobs_single(
            sequence_ids=args["sequences"][0], routing_key=keys[0]
        )
        return {
            "rows": rows,
            "refused": refused,
            "refused_media": refused_media,
            "again": again.tolist(),
        }

    out = asyncio.run(run())
    out["addresses"] = manager.server_addresses
    return out


def loss(args: dict) -> dict:
    """verl's distillation loss, both halves: the logits processor (distillation_ppo_loss with
    student logits, which verl routes to compute_topk_loss) and the final loss (with the
    processor's outputs as model_output), on a packed micro-batch as verl's FSDP engine
    builds it."""
    import numpy as np
    import torch
    import verl  # noqa: F401
    from tensordict import TensorDict
    from verl.trainer.distillation.losses import distillation_ppo_loss
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass

    config = compose(args["overrides"])
    distillation = omega_conf_to_dataclass(config.distillation)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)

    def nested(rows: list[list[int]]) -> torch.Tensor:
        return torch.nested.nested_tensor([torch.tensor(r) for r in rows], layout=torch.jagged)

    prompts, responses = args["prompts"], args["responses"]
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    n_tokens = sum(len(r) for r in responses)
    data = TensorDict(
        {
            "input_ids": nested(sequences),
            "prompts": nested(prompts),
            "responses": nested(responses),
            "response_mask": nested([[1] * len(r) for r in responses]),
        },
        batch_size=[len(sequences)],
    )
    tu.assign_non_tensor(
        data, dp_size=1, batch_num_tokens=n_tokens, global_batch_size=len(sequences)
    )
    logits = torch.from_numpy(np.load(args["logits"])).requires_grad_(True)
    outputs = distillation_ppo_loss(actor, distillation, data=data, student_logits=logits)
    outputs["distillation_losses"].sum().backward()
    out_dir = Path(args["out"])
    np.save(out_dir / "grad.npy", logits.grad.numpy())
    for name, value in outputs.items():
        np.save(out_dir / f"{name}.npy", value.detach().numpy())
    offsets = data["input_ids"].offsets()
    model_output = {
        k: torch.nested.nested_tensor_from_jagged(v.detach().squeeze(0), offsets)
        for k, v in outputs.items()
    }
    final, metrics = distillation_ppo_loss(
        actor, distillation, model_output=model_output, data=data
    )
    return {
        "final_loss": float(final),
        "metrics": {
            k: float(v.aggregate() if hasattr(v, "aggregate") else v) for k, v in metrics.items()
        },
        "strategy": actor.strategy,
        "loss_agg_mode": actor.loss_agg_mode,
    }


if __name__ == "__main__":
    mode, payload = sys.argv[1], json.loads(sys.argv[2])
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    result = {"plugin": plugin, "configs": configs, "teacher": teacher, "loss": loss}[mode](payload)
    print(json.dumps(result))
