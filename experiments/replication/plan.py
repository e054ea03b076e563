"""What `opd replicate` runs: the models, the data sizes and the OPD budget, full and tiny.

The full plan is sized for 2 CPU cores (docs/replication.md has its run time). The tiny plan
runs every stage of the full one on toy budgets so CI can check that the command completes and
writes every table; its numbers mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from experiments.replication.models import ModelSpec

STUDENT, TEACHER_X, TEACHER_Y, SAME_PIPELINE = "student", "teacher-x", "teacher-y", "same-pipeline"
# Teacher-x again, on another tokenization of the same text (vocab.py's "two-digit"): the
# teacher of the cross-tokenizer run (`opd train --cross-tokenizer auto`).
TEACHER_X_OTHER = "teacher-x-other-tokenizer"
# Every OPD run of the experiment, by the label its folder, metrics and tables use.
OPD_RUNS = (
    "opd-from-x",
    "opd-from-y",
    "opd-from-same-pipeline",
    "opd-from-self",
    "reverse",
    "coldstart+opd-from-y",
    "opd-from-x-other-tokenizer",  # the student from TEACHER_X_OTHER, across tokenizers
)


@dataclass(frozen=True)
class Plan:
    """Every size and budget of one replication; saved whole in results.json."""

    models: tuple[ModelSpec, ...]
    eval_prompts: int  # the held-out questions every accuracy is measured on
    opd_prompts: int  # the OPD prompt pool (disjoint from the eval questions)
    coldstart_prompts: int  # teacher-y answers these for the cold start's SFT
    opd_steps: int  # the same OPD budget for every run
    prompts_per_step: int
    n_rollouts: int
    lr: float
    eval_every: int
    probe_prompts: int
    depth_rollouts: int  # rollouts the depth probe continues at each prefix
    depth_prefixes: tuple[int, ...]
    coldstart_epochs: int
    coldstart_lr: float
    coldstart_batch: int
    # k of the top-k diagnostics and the student's candidates. The paper's k = 16 is 1e-4 of a
    # 150k vocabulary and holds 0.97-0.99 of the mass; here the vocabulary has 19 symbols and
    # the trained models put nearly all their mass on 1-2 of them, so k = 4 plays that part.
    top_k: int = 4
    max_new_tokens: int = 40
    depth_bucket: int = 8


def _models(seed: int, steps: int, hidden: int, layers: int, rare: int) -> tuple[ModelSpec, ...]:
    """The five models of the experiment (the tables' rows), at the given size and budget."""
    return (
        ModelSpec(
            STUDENT, "the student: style x, few examples of the restricted facts",
            "x", True, hidden, layers, steps, seed + 1, rare_facts=rare,
        ),
        ModelSpec(
            TEACHER_X, "compatible teacher: style x, all the facts",
            "x", False, hidden, layers, steps, seed + 2,
        ),
        ModelSpec(
            TEACHER_Y, "incompatible teacher: style y, all the facts",
            # style y's answer is assembled from reversed digits: it needs twice the steps
            "y", False, hidden, layers, 2 * steps, seed + 3,
        ),
        ModelSpec(
            SAME_PIPELINE, "same-pipeline teacher: the student's data, a larger model",
            # The student's data seed: the very same examples, seen twice by a larger model
            # with its own init. The paper's same-pipeline teacher is the stronger sibling
            # (7B vs 1.5B); one pass left this one weaker than the student (0.66 vs 0.75).
            "x", True, hidden + hidden // 3, layers + 1, 2 * steps, seed + 4, rare_facts=rare,
            epochs=2, data_seed=seed + 1,
        ),
        ModelSpec(
            TEACHER_X_OTHER, "teacher-x on another tokenizer: two-digit tokens, its own template",
            # teacher-x's recipe, seed and data (the same texts), only the tokenization differs
            "x", False, hidden, layers, steps, seed + 2, tokenization="two-digit",
        ),
    )  # fmt: skip


def full_plan(seed: int) -> Plan:
    """The recorded experiment: sized to show the findings within an hour on 2 cores."""
    return Plan(
        models=_models(seed, steps=600, hidden=96, layers=3, rare=600),
        eval_prompts=256,
        opd_prompts=2000,
        # Sized by measurement (docs/replication.md, finding 4): teacher-y itself needed 1,200
        # steps of 64 to learn style y from scratch. On 0.9 x 6,144 responses at lr 3e-3 and
        # batch 64, 4 epochs (348 steps) left the SFT-only student at 0.000 in one run and
        # 0.367 in another (the style is learnt in a sharp transition), 6 and 8 epochs at
        # 0.996 and 0.984; 8 keeps clear of the transition.
        coldstart_prompts=6144,
        opd_steps=150,
        prompts_per_step=8,
        n_rollouts=4,
        lr=1e-4,
        eval_every=25,
        probe_prompts=128,
        depth_rollouts=128,  # the advantage's 95% interval is about +-0.06 at 128
        # A style-x scratchpad is 21-29 tokens and its last column ends by token 22, so every
        # prefix up to 16 still leaves a column to compute and applies to (nearly) every
        # rollout; a deeper one would only leave the answer to copy.
        depth_prefixes=(0, 4, 8, 12, 16),
        coldstart_epochs=8,
        coldstart_lr=3e-3,
        coldstart_batch=64,
    )


def tiny_plan(seed: int) -> Plan:
    """Every stage of the full plan on toy budgets (CI): it checks plumbing, not findings."""
    full = full_plan(seed)
    return replace(
        full,
        models=_models(seed, steps=4, hidden=32, layers=1, rare=8),
        eval_prompts=12,
        opd_prompts=32,
        coldstart_prompts=8,
        opd_steps=2,
        prompts_per_step=2,
        n_rollouts=2,
        eval_every=1,
        probe_prompts=4,
        depth_rollouts=2,
        depth_prefixes=(0, 8),
        coldstart_epochs=1,
        coldstart_batch=4,
        max_new_tokens=12,
    )
