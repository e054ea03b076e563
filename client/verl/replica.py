"""The replica kind "opd" of verl: what verl instantiates for each replica of an opd teacher.

verl's TeacherModelManager builds `num_replicas` replicas of the class registered under the
teacher's `inference.name`, awaits `init_colocated(resource_pool)` on each (or
`init_standalone()`), then hands `replica._server_handle` to its load balancer. A replica of
verl's own kinds starts inference servers on the GPUs of its slice of the pool; this one
starts one small Ray actor (OpdTeacherServer, no CPU or GPU claimed) that forwards to opd, and
checks at start that the teacher answers. The pool's GPUs stay reserved by verl and unused:
verl 0.9.1 refuses a teacher pool of zero GPUs (docs/integrations.md says how to size it).
A student rollout cannot run on this replica kind: it scores, it does not sample.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from verl.workers.rollout.replica import RolloutMode, RolloutReplica

from opd.client.verl.server import OpdTeacherServer
from opd.client.verl.settings import read_settings

logger = logging.getLogger(__name__)


def _model_path(model_config: Any) -> str | None:
    """The teacher's model_path as verl hands it over (a DictConfig or an HFModelConfig)."""
    if model_config is None:
        return None
    path = getattr(model_config, "path", None)
    if path is None and hasattr(model_config, "get"):
        path = model_config.get("path")
    return None if path is None else str(path)


class OpdReplica(RolloutReplica):
    """A verl teacher replica whose server forwards to opd teachers over HTTP."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def init_colocated(self, resource_pool: Any) -> None:
        self.rollout_mode = RolloutMode.COLOCATED
        self.resource_pool = resource_pool
        await self.launch_servers()

    async def init_standalone(self) -> None:
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def init_hybrid(self, worker_group: Any) -> None:
        raise NotImplementedError(
            "rollout name 'opd' is for teachers (distillation.teacher_models.*.inference.name); "
            "the student's rollout needs an engine that samples (vllm, sglang)"
        )

    async def init_hybrid_colocated(self, worker_group: Any, resource_pool: Any) -> None:
        await self.init_hybrid(worker_group)

    async def launch_servers(self) -> None:
        settings = read_settings(self.config.engine_kwargs, _model_path(self.model_config))
        actor = ray.remote(OpdTeacherServer).options(
            num_cpus=0, max_concurrency=self.max_concurrency
        )
        server = actor.remote(settings)
        info = await server.connect.remote()
        logger.info(
            "opd teacher replica %d%s: %s (%s) at %s",
            self.replica_rank,
            self.name_suffix,
            info["name"],
            info["backend"],
            ", ".join(settings.urls),
        )
        self.servers = [server]
        self._server_handle = server
        # The load balancer keys servers by address: unique per replica, and says where it goes.
        self._server_address = f"{settings.urls[0]}#replica-{self.replica_rank}{self.name_suffix}"
