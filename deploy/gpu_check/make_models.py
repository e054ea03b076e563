"""Build the GPU check's teacher and student from configs, with a tokenizer made on the spot.

    python deploy/gpu_check/make_models.py OUT_DIR --size gpu --device cuda
        -> OUT_DIR/teacher, OUT_DIR/student (HF folders: safetensors, config, tokenizer)

The GPU host has no network and our carried files are capped at 64 MiB, so no real model
(SmolLM2's package alone is 93 MB) or tokenizer can come along. Random weights are enough for
what the check measures: numerics (server vs a float64 recompute of the same weights), speed and
memory depend on shapes, not on what the weights learnt. The shapes are real ones: the teacher
is Llama-3.2-1B's (hidden 2048, 16 layers, GQA 32/8 heads, vocabulary 128,256) with an untied
head, the student a ~0.3B Llama of the same vocabulary. `--size tiny` keeps the same structure
at toy sizes for the CPU mode.

The tokenizer is a byte-level BPE whose vocabulary is generated, not trained: the 256 byte
symbols, then letter sequences ('Ġa', 'ab', 'abc', ...) each with the merge that builds it,
until the model's vocabulary is filled exactly, plus ChatML's special tokens and template (what
the trainer's chat prompts need). So every id the models can emit decodes to text, and
`len(tokenizer) == vocab_size` as with real checkpoints.
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    """One Llama's shape (what LlamaConfig needs)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool


@dataclass(frozen=True)
class Size:
    """A teacher and a student sharing one vocabulary (the trainer checks they agree)."""

    vocab: int
    max_positions: int
    teacher: Shape
    student: Shape


SIZES = {
    # Llama-3.2-1B's shape (untied head: 1.5B parameters), a ~0.3B student.
    "gpu": Size(
        vocab=128_256,
        max_positions=8192,
        teacher=Shape(2048, 8192, 16, 32, 8, tied=False),
        student=Shape(1024, 4096, 12, 16, 4, tied=True),
    ),
    # The same structure at toy sizes: seconds on two CPU cores.
    "tiny": Size(
        vocab=1024,
        max_positions=2048,
        teacher=Shape(64, 128, 2, 4, 2, tied=False),
        student=Shape(32, 64, 1, 2, 1, tied=True),
    ),
}

# Scale of the teacher's logits (their standard deviation over the vocabulary). Random init
# gives ~0.9: a nearly flat distribution whose log-probs all sit near -log(V) and hide errors.
# At ~5, as in trained models, the top-k are well separated and the entropy is far from log(V).
TEACHER_LOGIT_STD = 5.0


def build_tokenizer(vocab_size: int):  # noqa: ANN201 (transformers' tokenizer class)
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    regular = vocab_size - len(SPECIALS)
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    if regular < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab) + len(SPECIALS)}")
    merges: list[tuple[str, str]] = []
    letters = string.ascii_lowercase
    frontier = ["Ġ", *letters]  # 'Ġ' is the byte-level symbol of a space
    while len(vocab) < regular:
        longer = []
        for prefix in frontier:
            for letter in letters:
                if len(vocab) == regular:
                    break
                token = prefix + letter
                vocab[token] = len(vocab)
                merges.append((prefix, letter))
                longer.append(token)
        frontier = longer
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    hf.chat_template = CHATML
    assert len(hf) == vocab_size, (len(hf), vocab_size)
    return hf


def build_model(shape: Shape, size: Size, tokenizer, device: str, logit_std: float | None):  # noqa: ANN001, ANN201
    """A random Llama of `shape` (seed 0), in bfloat16 on the CPU, ready to save.

    Built on `device` (a 1.5B model's random init takes seconds on a GPU, minutes on a CPU).
    Saved in bfloat16: half the bytes to write and read, and every server dtype then sees the
    same weights exactly (float32 and float64 hold each bfloat16 value), so a float32 server is
    compared with the float64 reference on identical weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=size.max_positions,
        rope_theta=500_000.0,
        tie_word_embeddings=shape.tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if logit_std is not None:
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            # final-norm outputs have ~unit components: a logit's std is |row| ~ std(w)*sqrt(h)
            head.mul_(logit_std / (float(head.float().std()) * shape.hidden**0.5))
    return model.to(torch.bfloat16).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu")
    parser.add_argument("--device", default="cpu", help="where the random init runs")
    args = parser.parse_args()
    size = SIZES[args.size]
    tokenizer = build_tokenizer(size.vocab)
    info = {"size": args.size, "vocab": size.vocab}
    for role, shape in (("teacher", size.teacher), ("student", size.student)):
        folder = args.out_dir / role
        std = TEACHER_LOGIT_STD if role == "teacher" else None
        model = build_model(shape, size, tokenizer, args.device, std)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        info[role] = {
            "path": str(folder),
            "parameters": sum(p.numel() for p in model.parameters()),
            **shape.__dict__,
        }
        print(f"{role}: {info[role]['parameters']:,} parameters -> {folder}", flush=True)
        del model
    (args.out_dir / "models.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
