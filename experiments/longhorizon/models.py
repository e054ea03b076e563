"""The pair: tiny Llamas of the replication, SFT'd on correct chain episodes of a few turns.

Each model is a `PairSpec`: a size, an SFT budget, and K, the number of turns of its training
episodes. Its SFT examples are built token-in/token-out exactly as opd's trainer builds an
episode (docs/environments.md): the opening ids of ChainEnv's first message, then per turn the
scratchpad's ids and `<eos>` (learned), and the environment's next message as
`TurnRenderer.observation_ids` (context). The model never sees an episode longer than K turns,
so depths past its K-th turn are outside what it was trained on.

The replication's code does the rest, unchanged: its tokenizer (vocab.py), its model builder
(models.build_model, the same seeded init) and opd's SFT loop. The one difference is the
context: build_model's config says 128 positions, a chain episode of 6 turns is ~180 tokens,
so the built model's `max_position_embeddings` is raised to `POSITIONS` before it is saved.
Llama's rotary embedding computes its angles from the position ids at every call (nothing is
sized by that number), so the weights are the replication's bit for bit; the number is what
`opd serve` and the trainer read as the model's context.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.longhorizon import task
from experiments.longhorizon.env import ChainEnv

POSITIONS = 256  # the models' context: a 6-turn episode with 32-token turns fits
CARD = "opd_longhorizon_model.json"
# Bumped whenever task.py, env.py or the recipe below change what a spec produces, so that
# models saved by an older version are retrained, not reused.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class PairSpec:
    """One model of the pair and the recipe that makes it."""

    name: str
    role: str  # what it stands for (for the tables)
    hidden: int
    layers: int
    steps: int  # SFT steps of batch_size episodes, one pass
    turns: int  # K: every SFT episode has exactly this many turns
    seed: int  # the init and the data order
    data_seed: int  # the SFT chains
    batch_size: int = 64
    lr: float = 3e-3


def tokenizer() -> Any:
    """The replication's character tokenizer, its model_max_length raised to POSITIONS (what
    it says only affects warnings; the vocabulary and template, which opd fingerprints, are
    the replication's)."""
    from experiments.replication.vocab import build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = POSITIONS
    return tok


def episode_example(tok: Any, renderer: Any, chain: task.Chain, turns: int) -> Any:
    """One correct episode of `turns` turns as an SFT Example: the assistant turns learned,
    the opening and the follow-up messages context."""
    from opd.client.episodes import AssistantTurn
    from opd.client.recipes.sft import Example

    env = ChainEnv(turns=turns)
    opening = renderer.opening_ids(env.reset(chain.row()))
    eos = int(tok.eos_token_id)
    response: list[int] = []
    trained: list[bool] = []
    total = chain.start
    for c in chain.addends[:turns]:
        text = task.scratchpad(total, c)
        total += c
        ids = [*tok(text, add_special_tokens=False)["input_ids"], eos]
        response += ids
        trained += [True] * len(ids)
        obs = env.step(AssistantTurn(text, [], False))
        if obs.done:
            break
        context = renderer.observation_ids(obs.messages)
        response += context
        trained += [False] * len(context)
    if not all(env.turn_correct):
        raise AssertionError(f"a scripted episode is graded wrong: {chain}")
    return Example(opening, response, trained)


def training_chains(spec: PairSpec, exclude: set[tuple[int, ...]]) -> list[task.Chain]:
    """The spec's SFT chains: steps x batch_size, none opening like a held-out episode."""
    rng = np.random.default_rng(spec.data_seed)
    return task.sample_chains(
        spec.steps * spec.batch_size, spec.turns, rng, exclude=exclude, distinct=False
    )


def held_out_digest(exclude: set[tuple[int, ...]]) -> str:
    """A fingerprint of the held-out openings: a saved model is reused only with the same."""
    text = ";".join(",".join(map(str, key)) for key in sorted(exclude))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _card_matches(folder: Path, spec: PairSpec, digest: str) -> bool:
    card = folder / CARD
    if not card.is_file():
        return False
    saved = json.loads(card.read_text())
    return (
        saved.get("spec") == asdict(spec)
        and saved.get("recipe_version") == RECIPE_VERSION
        and saved.get("held_out_digest") == digest
    )


def train_model(
    spec: PairSpec,
    out: Path,
    exclude: set[tuple[int, ...]],
    reuse: bool,
    log: Callable[[str], None] = print,
) -> Path:
    """SFT a fresh model of `spec` on its own chains (reused from `out` when its card holds
    the same spec, recipe version and held-out set); save it as an HF folder."""
    from transformers import GenerationConfig

    from experiments.replication.models import ModelSpec, build_model
    from opd.client.episodes import TurnRenderer
    from opd.client.recipes.sft import SFTConfig, sft

    digest = held_out_digest(exclude)
    if reuse and _card_matches(out, spec, digest):
        log(f"model {spec.name}: reusing {out}")
        return out
    log(f"model {spec.name}: {spec.role} ({spec.steps} SFT steps of {spec.batch_size})")
    tok = tokenizer()
    pad, eos = int(tok.pad_token_id), int(tok.eos_token_id)
    # The replication's builder and init (style and restriction do not enter the model).
    shape = ModelSpec(spec.name, spec.role, "x", False, spec.hidden, spec.layers, spec.steps,
                      spec.seed)  # fmt: skip
    model = build_model(shape, len(tok), pad, eos)
    model.config.max_position_embeddings = POSITIONS
    renderer = TurnRenderer(tok)
    chains = training_chains(spec, exclude)
    examples = [episode_example(tok, renderer, c, spec.turns) for c in chains]
    config = SFTConfig(
        epochs=1,
        lr=spec.lr,
        lr_schedule="cosine",
        warmup_ratio=0.05,
        batch_size=spec.batch_size,
        max_len=POSITIONS,
        seed=spec.seed,
    )
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if step % max(1, total // 4) == 0 or step == total:
            log(f"  {spec.name}: step {step}/{total} loss {metrics['sft/loss']:.4f}")

    history = sft(model, examples, config, out / "sft_metrics.jsonl", on_step=progress)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(out)
    card = {
        "spec": asdict(spec),
        "recipe_version": RECIPE_VERSION,
        "held_out_digest": digest,
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": len(examples),
        "tokens_per_example": sum(e.n_tokens for e in examples) / len(examples),
        "final_loss": history[-1]["sft/loss"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / CARD).write_text(json.dumps(card, indent=1))
    return out


def card(folder: Path) -> dict[str, Any]:
    """A trained model's card (its spec, size, SFT time)."""
    return json.loads((folder / CARD).read_text())
