"""The pair: a teacher that follows the follow-up protocol, and its layer-subset student.

The teacher is the embedded SmolLM2-135M-Instruct fine-tuned with opd's own SFT loop
(opd.client.recipes.sft) on scripted, correct follow-up episodes. Each episode is built
token-in/token-out exactly as the trainer builds one (docs/environments.md): the opening ids,
then per turn the correct answer's ids and `<|im_end|>` (learned), the environment's next
question as `renderer.observation_ids` (context). The student keeps `keep` evenly spaced
layers of the fine-tuned teacher (opd.client.train.student.build_layer_subset_student), as the
quickstart builds its student from its teacher: the same patterns, less capacity.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1
CARD = "opd_multiturn_model.json"


def scripted_example(tokenizer: Any, renderer: Any, env: Any, row: dict) -> Any:
    """One correct episode of `env` on `row` as an SFT Example: the assistant turns learned,
    the opening and the user turns context."""
    from opd.client.episodes import AssistantTurn
    from opd.client.recipes.sft import Example

    opening = renderer.opening_ids(env.reset(row))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    response: list[int] = []
    trained: list[bool] = []
    for value in env.values:
        turn = tokenizer.encode(str(value), add_special_tokens=False) + [end]
        response += turn
        trained += [True] * len(turn)
        obs = env.step(AssistantTurn(str(value), [], False))
        if obs.done:
            break
        context = renderer.observation_ids(obs.messages)
        response += context
        trained += [False] * len(context)
    return Example(opening, response, trained)


def scripted_examples(model_dir: Path, rows: Sequence[dict], turns: int, env_seed: int) -> list:
    """Correct episodes of FollowupEnv(turns, env_seed) on every row."""
    from transformers import AutoTokenizer

    from opd.client.episodes import FollowupEnv, TurnRenderer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    renderer = TurnRenderer(tokenizer)
    return [
        scripted_example(tokenizer, renderer, FollowupEnv(turns=turns, seed=env_seed), row)
        for row in rows
    ]


def _card_matches(folder: Path, recipe: dict) -> bool:
    card = folder / CARD
    if not card.is_file():
        return False
    saved = json.loads(card.read_text())
    return saved.get("recipe") == recipe and saved.get("recipe_version") == RECIPE_VERSION


def sft_teacher(
    base_dir: Path,
    out: Path,
    rows: Sequence[dict],
    *,
    turns: int,
    env_seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    train_layers: int,
    seed: int,
    reuse: bool,
    log: Callable[[str], None],
) -> Path:
    """The fine-tuned teacher in `out` (reused when its card holds the same recipe)."""
    recipe = {
        "base": str(base_dir), "rows": len(rows), "rows_digest": _digest(rows), "turns": turns,
        "env_seed": env_seed, "steps": steps, "batch_size": batch_size, "lr": lr,
        "train_layers": train_layers, "seed": seed,
    }  # fmt: skip
    if reuse and _card_matches(out, recipe):
        log(f"teacher: reusing {out}")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.client.configs.coldstart import SFTConfig
    from opd.client.recipes.sft import sft

    started = time.perf_counter()
    examples = scripted_examples(base_dir, rows, turns, env_seed)
    # one epoch over `steps` batches: as many rows as the budget takes, each seen once
    examples = examples[: steps * batch_size]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    _train_top_layers(model, train_layers)
    config = SFTConfig(
        epochs=1, lr=lr, batch_size=batch_size, max_len=1024, warmup_ratio=0.1, seed=seed
    )
    out.mkdir(parents=True, exist_ok=True)

    def on_step(step: int, total: int, m: dict[str, float]) -> None:
        if step == 1 or step % 25 == 0 or step == total:
            log(f"  teacher SFT step {step}/{total}: loss {m['sft/loss']:.3f}")

    history = sft(model, examples, config, out / "sft_metrics.jsonl", on_step)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    card = {
        "recipe_version": RECIPE_VERSION,
        "recipe": recipe,
        "examples": len(examples),
        "tokens_per_example": sum(e.n_tokens for e in examples) / len(examples),
        "final_loss": history[-1]["sft/loss"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / CARD).write_text(json.dumps(card, indent=1))
    return out


def _train_top_layers(model: Any, n: int) -> None:
    """Train the top `n` decoder layers and the final norm only: the backward pass then stops
    there, which saves CPU time. The embeddings (tied to the LM head) and the lower layers keep
    their weights."""
    layers = model.get_decoder().layers
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - n :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    for p in model.get_decoder().norm.parameters():
        p.requires_grad_(True)


def layer_student(teacher_dir: Path, out: Path, keep: int, reuse: bool) -> Path:
    """`keep` evenly spaced layers of the fine-tuned teacher (rebuilt when the teacher is)."""
    from opd.client.train.student import build_layer_subset_student

    recipe = {"teacher_card": _teacher_card(teacher_dir), "keep": keep}
    if reuse and _card_matches(out, recipe):
        return out
    build_layer_subset_student(teacher_dir, out, keep)
    (out / CARD).write_text(
        json.dumps({"recipe_version": RECIPE_VERSION, "recipe": recipe}, indent=1)
    )
    return out


def _teacher_card(teacher_dir: Path) -> Any:
    card = teacher_dir / CARD
    return json.loads(card.read_text()) if card.is_file() else None


def _digest(rows: Sequence[dict]) -> str:
    import hashlib

    text = json.dumps(list(rows), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
