"""One student-side contender of `opd bench-train` in its own process, driven line by line.

    python -m opd.bench.train_worker KIND CONFIG_JSON    (then {"cmd": "round"} lines on stdin)

Kinds:
- rollout: a rollout engine flavour samples a fixed prompt set (fresh seeds each round); the
  round reports completion tokens, engine seconds, and the trainer's statistics pass seconds;
- step: a whole `opd train` step (Trainer.train_step) against a live teacher, with its timing
  split (engine, statistics, teacher wait, update, weight sync);
- math: peak extra memory of the student math on N completion positions from final hidden
  states: the loss (LM head, log_softmax, objective, backward) and the rollout statistics, each
  on full [N, V] logits and in chunks.

A flavour is (engine, hf sequences per generate call, LM-head chunk): `hf-single` is today's
path before this bench existed (one prompt per generate call, full-vocabulary logits),
`hf-batched` and `vllm` the batched engines with chunked math (opd.bench.train_runner.FLAVOURS).
Each contender owns its process: vLLM's CPU worker binds the process's threads, and peak memory
is a per-process high-water mark.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from opd.bench.worker import peak_extra_bytes, serve


def _prompts(tokenizer: Any, count: int) -> list[tuple[int, list[int]]]:
    from opd.client.train.prompts import load_prompts
    from opd.client.train.student import chat_prompt_ids

    texts = load_prompts("shipped", "prompt")
    return [(i, chat_prompt_ids(tokenizer, texts[i % len(texts)])) for i in range(count)]


class Rollout:
    def __init__(self, cfg: dict[str, Any]) -> None:
        from opd.client.configs.groups import SamplingGroup, StudentRuntime
        from opd.client.train.factory import build_student

        torch.manual_seed(0)
        runtime = StudentRuntime(
            device=cfg.get("device", "cpu"),
            rollout_engine=cfg["engine"],
            hf_max_sequences=int(cfg["hf_max_sequences"]),
        )
        built = build_student(
            cfg["student"], runtime, head_chunk_tokens=int(cfg["head_chunk_tokens"])
        )
        self.student, self.engine = built.module, built.engine
        self.prompts = _prompts(built.tokenizer, int(cfg["prompts"]))
        sampling = SamplingGroup(n=int(cfg["n"]), max_tokens=int(cfg["max_new_tokens"]))
        self.params = built.sampling(sampling)
        self.top_k = 16

    def round(self) -> dict[str, Any]:
        from opd.client.train.engines import draw_seeds
        from opd.client.train.rollouts import with_statistics

        seeds = draw_seeds(len(self.prompts))
        t0 = time.perf_counter()
        samples = self.engine.sample([ids for _, ids in self.prompts], self.params, seeds)
        engine_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with_statistics(self.student, list(zip(self.prompts, samples, strict=True)), self.top_k)
        stats_s = time.perf_counter() - t0
        tokens = sum(len(s.completion_ids) for group in samples for s in group)
        return {"tokens": tokens, "engine_s": engine_s, "stats_s": stats_s}


class Step:
    def __init__(self, cfg: dict[str, Any]) -> None:
        from opd.client.configs.train import TrainConfig
        from opd.client.train.trainer import Trainer
        from opd.shared.config_cli import from_flags

        self.trainer = Trainer(
            from_flags(
                TrainConfig,
                student=cfg["student"],
                teacher_url=[cfg["teacher_url"]],
                prompts="shipped",
                run_dir=tempfile.mkdtemp(prefix="bench-train-"),
                max_steps=10_000,
                prompts_per_step=int(cfg["prompts"]),
                n_rollouts=int(cfg["n"]),
                max_new_tokens=int(cfg["max_new_tokens"]),
                objective=cfg["objective"],
                lr=1e-5,
                rollout_engine=cfg["engine"],
                hf_max_sequences=int(cfg["hf_max_sequences"]),
                head_chunk_tokens=int(cfg["head_chunk_tokens"]),
                micro_batch_size=int(cfg["micro_batch_size"]),
                candidates=cfg.get("candidates", "sampler"),
                share_prompts=bool(cfg.get("share_prompts", True)),
                overlap_forward=bool(cfg.get("overlap_forward", True)),
                lora_rank=int(cfg.get("lora_rank", 0)),
                lora_alpha=2.0 * int(cfg.get("lora_rank", 0) or 1),
                lora_sync=cfg.get("lora_sync", "adapters"),
                checkpoint_every=10_000,
                logger=["jsonl"],
                device=cfg.get("device", "cpu"),
            )
        )

    def round(self) -> dict[str, Any]:
        metrics = self.trainer.train_step()
        self.trainer.step += 1
        keys = ("step_s", "engine_s", "stats_s", "score_s", "score_wait_s", "train_s", "sync_s")
        out = {k: float(metrics.get(f"time/{k}", 0.0)) for k in keys}
        out["tokens"] = int(metrics["rollout/completion_tokens"])
        # AdamW's moments: what a LoRA student saves (its adapters' only)
        out["optimizer_bytes"] = sum(
            t.numel() * t.element_size()
            for state in self.trainer.optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        out["engine_logp_abs_diff_max"] = metrics.get("rollout/engine_logp_abs_diff_max")
        return out


class Math:
    def __init__(self, cfg: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        from opd.client.train.positions import TokenBatch

        self.device = torch.device(cfg.get("device", "cpu"))
        model = AutoModelForCausalLM.from_pretrained(cfg["student"], dtype=torch.float32)
        self.model = model.to(self.device)
        self.chunk = int(cfg["head_chunk_tokens"])
        self.n = int(cfg["tokens"])
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        hidden = model.config.hidden_size
        k = 16
        self.h = torch.randn(self.n, hidden, generator=g).to(self.device)
        n = self.n

        def ids(*shape: int) -> torch.Tensor:
            return torch.randint(0, vocab, shape, generator=g).to(self.device)

        def logps(*shape: int) -> torch.Tensor:
            return (-torch.rand(*shape, generator=g) * 5).to(self.device)

        self.batch = TokenBatch(
            ids_BL=torch.zeros(1, 1, dtype=torch.long),
            mask_BL=torch.ones(1, 1, dtype=torch.long),
            positions=[np.arange(1, n + 1)],
            seq_offsets=torch.tensor([0, n], device=self.device),
            target_N=ids(n),
            student_token_logp_N=logps(n),
            student_topk_ids_NK=ids(n, k),
            student_topk_logp_NK=logps(n, k),
            teacher_token_logp_N=logps(n),
            teacher_cand_logp_NK=logps(n, k),
            teacher_topk_ids_Nk=ids(n, k),
            teacher_topk_logp_Nk=logps(n, k),
        )
        self.setup = {"tokens": n, "vocab": vocab, "hidden": hidden, "chunk_tokens": self.chunk}

    def _peak_of(self, fn: Any) -> int:
        return peak_extra_bytes(fn, self.device)

    def _loss(self, chunk: int) -> None:
        from opd.client.train.objectives import ObjectiveConfig
        from opd.client.train.student_math import chunked_head_loss

        head = self.model.get_output_embeddings()
        h = self.h.clone().requires_grad_(True)
        loss = chunked_head_loss(
            h, head.weight, None, self.batch, ObjectiveConfig(name="student-topk"), chunk
        )
        loss.sum().backward()
        head.weight.grad = None

    def _stats(self, chunk: int) -> None:
        from opd.modeling.head import head_spec
        from opd.modeling.scoring import score_hidden

        score_hidden(
            head_spec(self.model), self.h, self.batch.target_N, top_k=16, entropy=True,
            chunk_tokens=chunk if chunk > 0 else self.n,
        )  # fmt: skip

    def _stats_full_logits(self) -> None:
        """The statistics as computed before chunking: log_softmax of full [N, V] logits."""
        with torch.no_grad():
            logp = torch.log_softmax(self.model.get_output_embeddings()(self.h).float(), dim=-1)
            logp.gather(1, self.batch.target_N[:, None])
            torch.topk(logp, 16, dim=-1)
            -(logp.exp() * logp).nan_to_num().sum(-1)

    def round(self) -> dict[str, Any]:
        runs = {
            "loss_full": lambda: self._loss(0),
            "loss_chunked": lambda: self._loss(self.chunk),
            "stats_full": self._stats_full_logits,
            "stats_chunked": lambda: self._stats(self.chunk),
        }
        for fn in runs.values():  # first calls allocate pools and workspaces: not counted
            fn()
        return {
            f"{k}_peak_bytes": min(self._peak_of(fn) for _ in range(2)) for k, fn in runs.items()
        }


KINDS = {"rollout": Rollout, "step": Step, "math": Math}


def _protocol_stream():  # noqa: ANN202
    """The protocol's own copy of stdout; fd 1 itself then points at stderr, so that whatever
    the libraries print (vLLM logs to stdout) cannot interleave with the JSON lines."""
    out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def main() -> None:
    kind, cfg = sys.argv[1], json.loads(sys.argv[2])
    stream = _protocol_stream()
    serve(KINDS[kind](cfg), stream)


if __name__ == "__main__":
    main()
