"""The replication's models: tiny Llama transformers trained from scratch on the task.

Each model is a `ModelSpec`: a scratchpad style, whether its data is restricted (see task.py),
a size, a training budget and a tokenization (vocab.py: the shared one, or the two-digit one
of the cross-tokenizer teacher). Training is plain next-token SFT on the scratchpads with
opd's own SFT loop (`opd.client.recipes.sft`), and each model is saved as a standard HF folder
(weights, config, tokenizer, generation config), so `opd serve` serves it and `opd train`
trains it like any other model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from experiments.replication import task
from experiments.replication.vocab import Tokenization, build_tokenizer
from opd.client.recipes.sft import Example, SFTConfig, sft
from opd.shared.chat import chat_prompt_ids


@dataclass(frozen=True)
class ModelSpec:
    """One model of the experiment and the recipe that makes it."""

    name: str
    role: str  # what the model stands for in the paper's setting (for the tables)
    style: task.Style
    restricted: bool  # trained (almost) only on problems without the restricted facts
    hidden: int
    layers: int
    steps: int
    seed: int
    # With `restricted`: this many problems that do need a restricted fact are mixed in, so the
    # model knows those facts a little (weakly, uncertainly) instead of not at all.
    rare_facts: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    # Passes over the data: `steps` is the total number of SFT steps, so a spec draws
    # steps x batch_size / epochs examples and sees each `epochs` times.
    epochs: int = 1
    # The seed of the training data (None: `seed`). Two models with the same data seed, style,
    # restriction and budget see the very same examples, whatever their size and init.
    data_seed: int | None = None
    # The tokenizer the model is trained and saved with (vocab.py). The examples are the same
    # texts whatever it is: only their token ids differ.
    tokenization: Tokenization = "shared"


# Bumped whenever task.py, vocab.py or the training recipe below change what a spec produces,
# so that models saved by an older version are retrained, not reused. (A new spec field whose
# default keeps what every older spec produced, like `tokenization`, does not bump it.)
RECIPE_VERSION = 2


def _examples(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, n: int, exclude: set[tuple[int, int]]
) -> list[Example]:
    """n training examples of the spec's style and restriction, none of them in `exclude`."""
    rng = np.random.default_rng(spec.seed if spec.data_seed is None else spec.data_seed)
    rare = spec.rare_facts if spec.restricted else 0
    pairs = task.sample_pairs(n - rare, rng, restricted=spec.restricted, exclude=exclude)
    if rare:
        pairs += task.sample_pairs(rare, rng, only_restricted=True, exclude=exclude | set(pairs))
    eos = int(tokenizer.eos_token_id)
    return [
        Example(
            chat_prompt_ids(tokenizer, task.prompt(a, b)),
            [
                *tokenizer(task.scratchpad(a, b, spec.style), add_special_tokens=False)[
                    "input_ids"
                ],
                eos,
            ],
        )
        for a, b in pairs
    ]


def training_examples(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, exclude: set[tuple[int, int]]
) -> list[Example]:
    """The spec's whole training set: steps x batch_size / epochs examples."""
    if (spec.steps * spec.batch_size) % spec.epochs:
        raise ValueError(f"{spec.name}: steps x batch_size must divide into {spec.epochs} epochs")
    return _examples(spec, tokenizer, spec.steps * spec.batch_size // spec.epochs, exclude)


def build_model(spec: ModelSpec, vocab_size: int, pad_id: int, eos_id: int) -> LlamaForCausalLM:
    """A freshly initialised (seeded) Llama of the spec's size, tied embeddings, 128 positions."""
    heads = max(1, spec.hidden // 32)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def held_out_digest(exclude: set[tuple[int, int]]) -> str:
    """A fingerprint of the pairs a model never saw: a saved model is only reused when the
    held-out set (eval, OPD and cold-start questions) is the same as the run's."""
    text = ";".join(f"{a}+{b}" for a, b in sorted(exclude))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_model(
    spec: ModelSpec,
    out: Path,
    exclude: set[tuple[int, int]],
    log: Callable[[str], None] = print,
) -> Path:
    """SFT a fresh model of `spec` on its own data (never a pair in `exclude`); save to out."""
    tokenizer = build_tokenizer(spec.tokenization)
    pad, eos = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
    model = build_model(spec, len(tokenizer), pad, eos)
    examples = training_examples(spec, tokenizer, exclude)
    config = SFTConfig(
        epochs=spec.epochs,
        lr=spec.lr,
        lr_schedule="cosine",
        warmup_ratio=0.05,
        batch_size=spec.batch_size,
        max_len=128,
        seed=spec.seed,
    )
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if step % max(1, total // 5) == 0 or step == total:
            log(f"  {spec.name}: step {step}/{total} loss {metrics['sft/loss']:.4f}")

    history = sft(model, examples, config, out / "sft_metrics.jsonl", on_step=progress)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(out)
    card = {
        **asdict(spec),
        "recipe_version": RECIPE_VERSION,
        "held_out_digest": held_out_digest(exclude),
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": len(examples),
        "final_loss": history[-1]["sft/loss"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "opd_replication_model.json").write_text(json.dumps(card, indent=1))
    return out
