"""`opd train`: on-policy distillation of a student against a teacher scoring service.

    opd train --student runs/student --teacher-url http://127.0.0.1:8000 --prompts prompts.jsonl
    opd train ... --resume latest        # continue the run in --run-dir exactly

One step:
  1. take `prompts_per_step` prompts (seeded per-epoch order, position saved in checkpoints);
  2. the rollout engine (opd.client.train.engines: hf or vllm) samples `n_rollouts` completions
     of every prompt in one batched call and hands out its top-K ids as the candidates; the
     chunks go to the teacher (opd.client.train.pipeline) while the first micro-batch's decoder
     forward runs; the request asks for what the objective needs (objectives.REGISTRY) and,
     with diagnostics on, what they read (with --candidates trainer, or a teacher of another
     tokenizer, a statistics pass of the trainer's records the student's numbers first, chunk
     by chunk, overlapped with the scoring);
     with --horizon (opd.client.train.horizon) the samples are cut to the step's horizon before
     the statistics, so nothing past it is scored or trained; with --reanchor-prob
     (opd.client.train.reanchor) the teacher writes some of an episode's turns;
  3. wait for the remaining scores (`time/score_wait_s` is what the student really waited);
  4. `ppo_epochs` optimizer steps over the batch, each accumulating gradients over micro-batches
     of `micro_batch_size` sequences (LM head and objective in chunks; the first epoch's pass
     records the student's rollout-time numbers, RowNumbers); token-mean loss over all
     completion tokens of the step; under torchrun DDP or, with --fsdp, FSDP2
     (opd.client.train.fsdp);
  5. the engine gets the new weights (vllm: in memory, a LoRA student's adapters alone; hf
     samples the trainer's module itself);
  6. diagnostics (opd.client.train.diagnostics) from the same arrays (flattened once into
     opd.client.train.positions.PositionStats); saved rollouts; one log call; checkpoint.
With --eval-set, the student's accuracy on held-out questions is measured before step 1, every
--eval-every steps and after the last, beside the teacher's (opd.client.evaluation.in_training).

Reading order below: the Trainer (set-up, `run`, the step: collect -> update -> diagnostics,
evaluate, checkpoint), then the helpers (score_spec, the engine agreement check, the schedule).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opd.client.configs.train import TrainConfig
from opd.client.evaluation.in_training import TrainingEval
from opd.client.train import fsdp
from opd.client.train import objectives as obj
from opd.client.train.bridge import ScoreSpec
from opd.client.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from opd.client.train.cross_tokenizer import CrossSetup, conversations
from opd.client.train.diagnostics import compute_diagnostics, sampled_kl
from opd.client.train.distributed import (
    all_sum,
    all_sum_array,
    barrier,
    device_for,
    gather_rng_states,
    init_from_env,
    join_single_rank,
    mean_metrics,
    shutdown,
)
from opd.client.train.episodes import EpisodeSampler, EpisodeSetup, episode_metrics
from opd.client.train.factory import build_student, connect
from opd.client.train.horizon import UNBOUNDED, Horizon, HorizonControl
from opd.client.train.loggers import build_loggers
from opd.client.train.lora import ADAPTER_FOLDER, merged_state, trainable_parameters
from opd.client.train.metric_log import (
    MetricLogger,
    NullLogger,
)
from opd.client.train.pipeline import collect
from opd.client.train.positions import PositionStats, TokenBatch, pad_right
from opd.client.train.prompts import PromptOrder
from opd.client.train.reanchor import (
    Reanchoring,
    TimedWriter,
    probability,
    reanchor_metrics,
    target_positions,
)
from opd.client.train.rollout_store import RolloutWriter, decode_pieces
from opd.client.train.rollouts import Rollout, SamplingParams, StepSampler, chunked
from opd.client.train.routing import training_prompts, training_rows
from opd.client.train.student import chat_prompt_ids
from opd.client.train.student_math import RowNumbers, StudentModule
from opd.client.train.teacher_metrics import per_teacher_metrics
from opd.shared.config_cli import replayable

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, config: TrainConfig, logger_: MetricLogger | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist = init_from_env(config.student.device)
        # Each rank samples its own stream; rank 0 of a single-process run is the plain seed.
        torch.manual_seed(config.seed + self.dist.rank)
        np.random.seed(config.seed + self.dist.rank)
        self.objective = config.objective
        self.resume_from = self._resume_folder()
        lora = config.lora if config.lora.rank else None
        # A LoRA student resumes as its base model plus the checkpoint's adapters (exact); a
        # full one from the checkpoint's model.
        student_path = (
            str(self.resume_from / "model")
            if self.resume_from and lora is None
            else config.student.model
        )
        self.built = build_student(
            student_path,
            config.student,
            train=True,
            objective=self.objective,
            head_chunk_tokens=config.optim.head_chunk_tokens,
            # FSDP2 gathers a layer per call; two decoder calls in one pass are not tested there
            share_prompts=config.optim.share_prompts and not config.optim.fsdp,
            gradient_checkpointing=config.optim.gradient_checkpointing,
            device=device_for(config.student.device, self.dist),
            seed=config.seed + self.dist.rank,
            before_engine=self._shard if config.optim.fsdp else None,
            lora=lora,
            adapter=self.resume_from / ADAPTER_FOLDER if self.resume_from and lora else None,
        )
        self.model, self.tokenizer = self.built.model, self.built.tokenizer
        self.peft = self.built.peft
        # Every pass over the student goes through this module's forward (student_math).
        self.student, self.engine = self.built.module, self.built.engine
        # The module that takes gradients: DDP-wrapped under torchrun, sharded in place with
        # --fsdp, the student itself otherwise.
        self.train_model: torch.nn.Module = self.student
        if self.dist.enabled and not config.optim.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            cuda = config.student.device.startswith("cuda")
            ids = [self.dist.local_rank] if cuda else None
            self.train_model = DistributedDataParallel(self.student, device_ids=ids)
        # with named teachers, owners[i] is the teacher of prompt i (refused here if none)
        self.episodes = EpisodeSetup.of(config.episodes, self.tokenizer)
        if self.episodes is not None:  # the environment reads whole rows
            self.prompts, self.owners = training_rows(config)
        else:
            self.prompts, self.owners = training_prompts(config)
        holdout = config.data.holdout
        if holdout >= len(self.prompts):
            raise ValueError(
                f"holdout={holdout} leaves no training prompts (have {len(self.prompts)})"
            )
        self.train_size = len(self.prompts) - holdout
        self.order = PromptOrder(self.train_size, config.seed, config.data.shuffle)
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(self.model),  # a LoRA student's: its adapters only
            lr=config.optim.lr,
            betas=config.optim.adam_betas,
            weight_decay=config.optim.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.step = 0
        max_depth = (
            config.episodes.max_episode_tokens if self.episodes else config.sampling.max_tokens
        )
        self.horizon = HorizonControl(config.horizon, max_depth)
        if self.resume_from:
            state = load_checkpoint(
                self.resume_from,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                rank=self.dist.rank,
                load_optimizer=self._load_optimizer,
            )
            self.step = int(state["step"])
            self.order.load_state(state["order"])
            self.horizon.load_state(state.get("horizon"))
        if logger_ is not None:
            self.metrics: MetricLogger = logger_
        elif self.dist.is_main:
            self.metrics = self._default_logger()
        else:
            self.metrics = NullLogger()
        self.spec = score_spec(config)
        # What the run's terminal says up front about its teachers (a cross-tokenizer one).
        self.notices: list[str] = []
        self.teachers = connect(
            config.teacher.specs(),
            config.teacher,  # a teacher restart is waited out (teacher_wait_s), not fatal
            self.spec,
            config.student_top_k,
            fingerprint=self.built.fingerprint(),
            log=self.notices.append,
            cross=CrossSetup(
                config.teacher.cross_tokenizer, self.tokenizer, conversations(self.prompts)
            ),
        )
        for line in self.notices:
            logger.info("%s", line)
        if config.reanchor.prob > 0 and any(t.bridge.cross for t in self.teachers.teachers):
            raise ValueError(
                "reanchor_prob: re-anchoring continues the student's exact token ids on the "
                "teacher, which a teacher of another tokenizer cannot read; use one of the "
                "student's tokenizer or --reanchor-prob 0"
            )
        # One student forward per step (docs/training.md): the engine hands out the candidate
        # ids and the loss pass records the student's numbers. A teacher of another tokenizer
        # splits each chunk's reward by the student's token log-probs when its answer comes
        # back, before any loss pass, so those runs keep the statistics pass.
        cross = any(t.bridge.cross for t in self.teachers.teachers)
        self.one_forward = config.candidates == "sampler" and not cross
        # The first micro-batch's decoder forward runs while the teacher scores (it needs only
        # the tokens). Single process only: DDP and FSDP expect one forward per backward.
        self.overlap_forward = (
            config.optim.overlap_forward and self.one_forward and not self.dist.enabled
        )
        self._early: tuple[torch.Tensor, torch.Tensor] | None = None
        if config.candidates == "sampler" and cross:
            self.notices.append(
                "candidates: a teacher of another tokenizer needs the student's numbers before "
                "scoring; this run keeps the statistics pass (two student forwards per step)"
            )
            logger.info("%s", self.notices[-1])
        self.teacher_info = self.teachers.teachers[0].info
        self.teacher_names = [t.name for t in self.teachers.teachers]
        self.teacher_weights = config.teacher.weights()
        self.sampling = self.built.sampling(config.sampling)
        self.writers = self._teacher_writers() if config.reanchor.prob > 0 else {}
        self._prompt_ids: dict[int, list[int]] = {}
        self.outcome = (
            TrainingEval(config, self.engine, self.tokenizer, self.dist, self.run_dir)
            if config.eval.data is not None
            else None
        )
        self.rollout_writer = (
            RolloutWriter(self.run_dir, decode_pieces(self.tokenizer))
            if config.save_rollouts and self.dist.is_main
            else None
        )
        if self.peft is not None and self.resume_from is not None:
            self.sync_engine()  # the engine loaded the base model; the adapters are trained

    def _shard(self, module: StudentModule) -> None:
        """--fsdp: shard the student in place across the torchrun ranks (before its engine)."""
        if not self.dist.enabled and not join_single_rank(self.config.student.device):
            raise ValueError("fsdp: run under torchrun (FSDP shards across its processes)")
        fsdp.shard(module, self.config.student.device)

    def run(self, on_step: Any = None) -> list[dict[str, float]]:
        """Train until max_steps (or epochs); returns the metrics of the steps run here."""
        config_json = json.dumps(replayable(self.config), indent=2)
        (self.run_dir / "config.json").write_text(config_json)
        how = f"resumed from {self.resume_from}" if self.resume_from else "started fresh"
        logger.info("%s at step %d; config %s", how, self.step, config_json)
        history = []
        if self.outcome is not None:
            # the gap recovery rate's teacher: the first one (docs/training.md)
            first_urls = self.config.teacher.specs()[0][1]
            self.outcome.start(self.step, first_urls, self.config.teacher.api_key)
        while not self.done():
            metrics = self.train_step()
            self.step += 1
            if self.outcome is not None and self.outcome.due(self.step, self.done()):
                metrics.update(self.outcome.metrics(self.outcome.measure(self.step)))
            self.metrics.log(self.step, metrics)
            history.append(metrics)
            if on_step is not None:
                on_step(self.step, metrics)
            if self.step % self.config.checkpoint_every == 0 or self.done():
                self.checkpoint()
        return history

    def done(self) -> bool:
        if self.step >= self.config.max_steps:
            return True
        epochs = self.config.data.epochs
        return epochs is not None and self.order.epoch >= epochs

    def train_step(self) -> dict[str, float]:
        step_started = time.perf_counter()
        rollouts, metrics = self.collect()
        self.engine.sleep()  # GPU: the engine's memory is the trainer's while it updates
        t0 = time.perf_counter()
        # The loss's micro-batches are slices of the flattened rollouts; in the one-forward
        # step their student numbers are filled in by the first epoch's loss pass.
        metrics.update(self.update(rollouts, PositionStats.from_rollouts(rollouts)))
        metrics["time/train_s"] = time.perf_counter() - t0
        # Flattened once more, complete: what the diagnostics and the horizon read.
        self.stats = PositionStats.from_rollouts(rollouts)
        if self.horizon.adaptive is not None:  # the next step's horizon, from all ranks' sums
            sums, counts = self.horizon.step_sums(self.stats)
            self.horizon.observe(all_sum_array(sums, self.dist), all_sum_array(counts, self.dist))
        metrics["time/sync_s"] = self.sync_engine()
        metrics.update(engine_agreement(rollouts))
        metrics.update(episode_metrics(rollouts))
        if self.writers:
            metrics.update(
                reanchor_metrics(rollouts, self._reanchor_prob(), list(self.writers.values()))
            )
        metrics.update(step_diagnostics(self.stats, self.config))
        if len(self.teacher_names) > 1:
            owners = [self.owners[r.prompt_index] for r in rollouts]  # type: ignore[index]
            metrics.update(
                per_teacher_metrics(
                    rollouts,
                    owners,
                    self.teacher_names,
                    lambda stats: step_diagnostics(stats, self.config),
                )
            )
        if self.config.save_rollouts:  # rank 0 writes; every rank logs the key (mean_metrics)
            t0 = time.perf_counter()
            if self.rollout_writer is not None:
                self.rollout_writer.write(self.step + 1, rollouts)
            metrics["time/save_rollouts_s"] = time.perf_counter() - t0
        tokens = sum(r.completion_len for r in rollouts)
        step_s = time.perf_counter() - step_started
        metrics["dist/world_size"] = self.dist.world_size
        metrics.update(
            {
                "time/step_s": step_s,
                "throughput/tokens_per_s": tokens / step_s,
                "rollout/sequences": len(rollouts),
                "rollout/completion_tokens": tokens,
                "rollout/truncated_frac": float(np.mean([r.truncated for r in rollouts])),
                "data/epoch": self.order.epoch,
            }
        )
        return mean_metrics(metrics, self.dist)

    def collect(self) -> tuple[list[Rollout], dict[str, float]]:
        """Sample and score one step's rollouts, scoring overlapping with sampling."""
        world, rank = self.dist.world_size, self.dist.rank
        indices = self.order.take(self.config.data.prompts_per_step * world)[rank::world]
        horizon = self.horizon.horizon
        rollouts, metrics = self._collect(
            indices,
            self.sampling,
            self.spec,
            horizon,
            self._reanchoring(indices),
            statistics=not self.one_forward,
        )
        if self.horizon.active:
            metrics.update(self._last_counts.metrics(horizon))
        return rollouts, metrics

    def _collect(
        self,
        indices: list[int],
        params: SamplingParams,
        spec: ScoreSpec,
        horizon: Horizon = UNBOUNDED,
        reanchor: Reanchoring | None = None,
        *,
        statistics: bool = True,
    ) -> tuple[list[Rollout], dict[str, float]]:
        """All `indices` sampled in one engine call, cut to `horizon`; statistics and scoring
        overlapped. Episodes are re-anchored by the teacher with `reanchor`. Without
        `statistics` the engine's top-K ids are the candidates and the loss pass records the
        rest (the one-forward step)."""
        top_k = self.config.student_top_k
        if self.episodes is not None:
            rows = [(i, self.prompts[i]) for i in indices]
            sampler: StepSampler = EpisodeSampler(
                self.engine,
                self.student,
                rows,
                params,
                top_k,
                self.episodes,
                horizon,
                reanchor,
                statistics,
            )
        else:
            prompts = [(i, self.prompt_ids(i)) for i in indices]
            sampler = StepSampler(
                self.engine, self.student, prompts, params, top_k, horizon, statistics
            )
        self._last_counts = sampler.counts
        owners = self.owners
        route = None if owners is None else (lambda r: owners[r.prompt_index])
        self._early = None
        early = self._early_forward if not statistics and self.overlap_forward else None
        got = collect(
            self.teachers.teachers,
            chunked(indices),
            sampler,
            spec,
            route=route,
            while_scoring=early,
        )
        timings = dict(got.timings)
        timings["time/engine_s"] = sampler.engine_s
        timings["time/stats_s"] = sampler.stats_s
        if got.routed is not None:
            return got.routed, timings
        return got.scored[self.teachers.teachers[0].name], timings

    def _early_forward(self, rollouts: list[Rollout]) -> None:
        """While the teacher scores: the first micro-batch's decoder forward (with its graph),
        which needs the tokens but not the teacher's numbers; update() takes it from there."""
        first = rollouts[: self.config.optim.micro_batch_size]
        ids_BL, mask_BL = pad_right([r.token_ids for r in first])
        device = next(self.model.parameters()).device
        ids, mask = torch.from_numpy(ids_BL).to(device), torch.from_numpy(mask_BL).to(device)
        hidden = self.student("hidden", ids, mask, [r.positions for r in first])
        self._early = (ids, hidden)

    def _teacher_writers(self) -> dict[str | None, TimedWriter]:
        """Re-anchoring: each teacher as a rollout engine over its /v1/generate, by name."""
        from opd.client.evaluation.episode_source import TeacherEngine
        from opd.client.teacher import TeacherClient

        return {
            name: TimedWriter(
                TeacherEngine(TeacherClient(urls, api_key=self.config.teacher.api_key))
            )
            for name, urls in self.config.teacher.specs()
        }

    def _reanchor_prob(self) -> float:
        return probability(self.config.reanchor, self.step, self.config.max_steps)

    def _reanchoring(self, indices: list[int]) -> Reanchoring | None:
        """This step's re-anchoring: its probability, each prompt's own teacher as writer."""
        if not self.writers:
            return None
        first = next(iter(self.writers.values()))
        owners = self.owners
        engines = [first if owners is None else self.writers[owners[i]] for i in indices]
        return Reanchoring(self._reanchor_prob(), engines)

    def sync_engine(self) -> float:
        """After the optimizer steps: the engine samples the new weights from the next step on
        (a no-op for the hf engine, which samples the trainer's module itself)."""
        if not self.engine.holds_weights:
            return 0.0
        if self.peft is not None:  # the adapters alone where the engine takes them
            if getattr(self.engine, "lora_rank", 0):
                return self.engine.sync_adapter(self.peft)
            return self.engine.sync_weights(merged_state(self.model))
        fsdp_on = self.config.optim.fsdp
        state = fsdp.full_model_state(self.student) if fsdp_on else self.model.state_dict()
        return self.engine.sync_weights(state)

    def update(self, rollouts: list[Rollout], stats: PositionStats) -> dict[str, float]:
        """`ppo_epochs` optimizer steps; each a token-mean over all completion tokens."""
        c = self.config.optim
        device = next(self.model.parameters()).device
        # off-policy targets (re-anchoring --reanchor-as target): teacher-written turns' ids
        targets = (
            [target_positions(r) for r in rollouts]
            if self.config.reanchor.written_as == "target" and self.writers
            else None
        )
        n_targets = 0 if targets is None else sum(len(t) for t in targets)
        # Token mean over every rank's tokens; DDP averages gradients, hence the world factor.
        total_tokens = all_sum(
            float(sum(r.completion_len for r in rollouts) + n_targets), self.dist
        )
        scale = self.dist.world_size / total_tokens
        micro = [
            TokenBatch.build(
                rollouts[i : i + c.micro_batch_size],
                stats.sequences(i, min(i + c.micro_batch_size, len(rollouts))),
                device,
                None if targets is None else targets[i : i + c.micro_batch_size],
            )
            for i in range(0, len(rollouts), c.micro_batch_size)
        ]
        losses, norms = [], []
        # the one-forward step: the first epoch's loss pass records the student's numbers
        record = stats.student_token_logp_N is None
        own: list[np.ndarray] = []  # the trainer's own top-K ids per rollout, from that pass
        out: dict[str, float] = {}
        for _ in range(c.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for i, batch in enumerate(micro):
                with self._grad_sync(last=i == len(micro) - 1):
                    if record:
                        hidden = self._take_early(batch) if i == 0 else None
                        loss, numbers = self.train_model("loss", batch, True, hidden)
                        start = i * c.micro_batch_size
                        mine = rollouts[start : start + len(batch.positions)]
                        micro[i] = fill_student_numbers(mine, batch, numbers, own)
                    else:
                        loss = self.train_model("loss", batch)
                    weights = self._token_weights(rollouts, i * c.micro_batch_size, batch)
                    if weights is not None:
                        loss = loss * weights
                    (loss.sum() * scale).backward()
                loss_sum += float(loss.detach().sum()) / total_tokens
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = c.max_grad_norm if c.max_grad_norm else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            self.optimizer.step()
            self.scheduler.step()
            losses.append(all_sum(loss_sum, self.dist))
            norms.append(fsdp.grad_norm_value(norm))
            if record:
                out.update(candidate_agreement(rollouts, own))
                record = False
        return out | {
            "train/loss": losses[0],
            "train/loss_last_epoch": losses[-1],
            "train/grad_norm": norms[0],
            "train/lr": self.scheduler.get_last_lr()[0],
        }

    def _take_early(self, batch: TokenBatch) -> torch.Tensor | None:
        """The early decoder forward (_early_forward), if it ran on exactly these ids."""
        early, self._early = self._early, None
        if early is None or not torch.equal(early[0], batch.ids_BL):
            return None
        return early[1]

    def _token_weights(
        self, rollouts: list[Rollout], start: int, batch: TokenBatch
    ) -> torch.Tensor | None:
        """Per-row loss weights of one micro-batch from --teacher-weight (each row weighs as its
        rollout's teacher: the objective's rows, then any target rows); None when all are 1."""
        if not self.teacher_weights or self.owners is None:
            return None
        assert batch.seq_offsets is not None
        counts = torch.diff(batch.seq_offsets)
        per_seq = [
            self.teacher_weights.get(self.owners[r.prompt_index], 1.0)
            for r in rollouts[start : start + len(counts)]
        ]
        w = torch.tensor(per_seq, dtype=torch.float32, device=counts.device)
        if batch.target_positions is not None:
            target_counts = [len(t) for t in batch.target_positions]
            counts = torch.cat([counts, torch.tensor(target_counts, device=counts.device)])
            w = torch.cat([w, w])
        return torch.repeat_interleave(w, counts)

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        """Name-keyed state (this version, any world size, FSDP or not) via the distributed
        state-dict helpers; index-keyed state (checkpoints of earlier versions) as saved."""
        if all(isinstance(k, int) for k in state["state"]):
            self.optimizer.load_state_dict(state)
        else:
            fsdp.load_full_optimizer_state(self.student, self.optimizer, state)

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced across ranks on the last micro-batch only."""
        if self.config.optim.fsdp:
            self.student.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def evaluate(self, prompt_indices: list[int], n: int, seed: int) -> dict[str, float]:
        """Diagnostics of fresh rollouts on fixed prompts, without updating the student.

        Sampling is seeded and the global RNG state is restored afterwards, so evaluating
        never changes what training samples (a resumed run stays identical)."""
        c = self.config
        full = ScoreSpec(top_k=c.teacher_top_k, candidates=True, entropy=True)
        rng_state = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            scored, _ = self._collect(list(prompt_indices), self.sampling.with_n(n), full)
        finally:
            torch.set_rng_state(rng_state)
        return compute_diagnostics(PositionStats.from_rollouts(scored), depth_bucket=c.depth_bucket)

    def checkpoint(self) -> Path:
        """All ranks call it (their RNG states are gathered); rank 0 writes."""
        folder = self.run_dir / "checkpoints" / f"step_{self.step}"
        rng_states = gather_rng_states(self.dist)
        # Parameter-name keyed optimizer state, gathered whole (collective under FSDP).
        optimizer_state = fsdp.full_optimizer_state(self.student, self.optimizer)
        model_state = (
            fsdp.full_model_state(self.student, cpu_offload=True)
            if self.config.optim.fsdp
            else merged_state(self.model)  # a LoRA student's model/: plain, adapters merged
            if self.peft is not None
            else None
        )
        if not self.dist.is_main:
            barrier(self.dist)
            return folder
        save_checkpoint(
            folder,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state={
                "step": self.step,
                "order": self.order.state(),
                "world_size": self.dist.world_size,
                "config": replayable(self.config),
                "horizon": self.horizon.state(),
            },
            rng_states=rng_states,
            model_state=model_state,
            optimizer_state=optimizer_state,
            adapter=self.peft,
        )
        prune_checkpoints(self.run_dir / "checkpoints", self.config.keep_checkpoints)
        barrier(self.dist)
        return folder

    def prompt_ids(self, index: int) -> list[int]:
        if index not in self._prompt_ids:
            self._prompt_ids[index] = chat_prompt_ids(self.tokenizer, self.prompts[index])
        return self._prompt_ids[index]

    # -- one step

    def _resume_folder(self) -> Path | None:
        resume = self.config.resume
        if not resume:
            return None
        if resume == "auto":  # a restarted Job: continue if a checkpoint exists, else start
            return latest_checkpoint(self.run_dir)
        folder = latest_checkpoint(self.run_dir) if resume == "latest" else Path(resume)
        if folder is None or not (folder / "state.json").is_file():
            raise FileNotFoundError(f"no checkpoint to resume from ({resume!r} in {self.run_dir})")
        return folder

    def _default_logger(self) -> MetricLogger:
        """metrics.jsonl always, plus the --logger backends (opd.client.train.loggers)."""
        return build_loggers(
            self.config.logger,
            self.run_dir,
            run_name=self.run_dir.name,
            config=replayable(self.config),
            resume_step=self.step if self.resume_from else None,
        )

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.engine.close()
        for writer in self.writers.values():
            writer.client.close()
        self.metrics.close()
        self.teachers.close()
        shutdown(self.dist)


# ---- helpers ------------------------------------------------------------------------------------


def score_spec(config: TrainConfig) -> ScoreSpec:
    """What the teacher is asked for: the objective's needs (objectives.REGISTRY), and with
    diagnostics on, everything they read too (top-k, candidate log-probs, entropy)."""
    entry = obj.objective(config.objective)
    full = config.diagnostics
    adaptive = config.horizon.parsed()[0] == "adaptive"  # reads the top-k overlap
    return ScoreSpec(
        top_k=config.teacher_top_k if full or entry.needs_teacher_topk or adaptive else 0,
        candidates=full or entry.needs_candidates,
        entropy=full,
    )


def step_diagnostics(stats: PositionStats, config: TrainConfig) -> dict[str, float]:
    """The method's diagnostics, or with them off just the sampled reverse KL (which needs only
    the token log-probs every request returns)."""
    if config.diagnostics:
        return compute_diagnostics(stats, depth_bucket=config.depth_bucket)
    return {"kl/sampled": sampled_kl(stats), "tokens/count": float(stats.n_positions)}


def fill_student_numbers(
    rollouts: list[Rollout], batch: TokenBatch, numbers: RowNumbers, own: list[np.ndarray]
) -> TokenBatch:
    """The one-forward step, after a micro-batch's first loss pass: each of its rollouts gets
    the student's numbers that pass read (its rollout-time values: the weights had not moved
    since sampling), `own` each rollout's top-K ids by the trainer's forward, and the returned
    batch holds them as p_old for the later ppo epochs."""
    assert batch.seq_offsets is not None
    offsets = batch.seq_offsets.cpu().numpy()
    token, cand, entropy = (
        t.detach().cpu().numpy()
        for t in (numbers.token_logp_N, numbers.cand_logp_NK, numbers.entropy_N)
    )
    top = numbers.topk_ids_NK.cpu().numpy().astype(np.int64)
    for j, r in enumerate(rollouts):
        a, b = int(offsets[j]), int(offsets[j + 1])
        r.student_token_logp_T, r.student_topk_logp_TK = token[a:b], cand[a:b]
        r.student_entropy_T = entropy[a:b]
        own.append(top[a:b])
    return replace(
        batch,
        student_token_logp_N=numbers.token_logp_N.detach(),
        student_topk_logp_NK=numbers.cand_logp_NK.detach(),
    )


def candidate_agreement(rollouts: list[Rollout], own: list[np.ndarray]) -> dict[str, float]:
    """How the engine's candidate ids compare with the trainer's own top-K at the same
    positions (the one-forward step): the share of positions whose two sets differ, and of
    candidate ids outside the trainer's top-K. The objectives read exact log-probs at the ids
    sent either way; a difference is the engine's numerics at near-ties (docs/training.md)."""
    if not own:
        return {}
    cand_NK = np.concatenate([r.student_topk_ids_TK for r in rollouts])
    own_NK = np.concatenate(own)
    if not len(cand_NK):
        return {}
    inside_NK = (cand_NK[:, :, None] == own_NK[:, None, :]).any(-1)
    return {
        "student/candidates_differ_frac": float((~inside_NK).any(1).mean()),
        "student/candidates_outside_frac": float((~inside_NK).mean()),
    }


def engine_agreement(rollouts: list[Rollout]) -> dict[str, float]:
    """How far the engine's log p of its sampled tokens is from the trainer's own (mean and
    max |difference| over the step's tokens): near float noise when the engine samples the
    trainer's current weights, large when a weight sync was missed. Empty for engines that
    report no log-probs (hf samples the trainer's module itself)."""
    pairs = [
        (r.engine_token_logp_T, r.student_token_logp_T)
        for r in rollouts
        if r.engine_token_logp_T is not None
    ]
    if not pairs:
        return {}
    diff = np.abs(np.concatenate([e - s for e, s in pairs]))
    return {
        "rollout/engine_logp_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "rollout/engine_logp_abs_diff_max": float(diff.max()) if diff.size else 0.0,
    }


def lr_lambda(config: TrainConfig):
    optim = config.optim

    def schedule(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        total = max(1, config.max_steps * optim.ppo_epochs - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / total)
        if optim.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if optim.lr_schedule == "linear":
            return 1.0 - progress
        return 1.0

    return schedule
