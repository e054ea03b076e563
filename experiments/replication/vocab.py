"""The replication's tokenizers, each saved as a standard HF fast tokenizer (tokenizer.json) with
a chat template, so `opd serve`, `opd train` and every recipe load it as they load any model's
tokenizer (and fingerprint it).

- "shared": one id per character; every model of the paper's findings has it.
- "two-digit": another tokenization of the same text, for the teacher that checks
  cross-tokenizer OPD (`opd train --cross-tokenizer auto`). Two digits in a row are one token
  ("00".."99", taken greedily from the left, before single characters), so a column sum
  `12` or an answer `632` (`63`, `2`) is cut differently from the shared tokenizer; it has its
  own special tokens, ids (its two-digit tokens first) and chat template (other markers). Every
  id, most token boundaries and the rendered prompt differ; the alignment then pairs one
  teacher token with one or two student characters (against a character-level student a chunk
  is one teacher token: the student can cut everywhere).

Why characters and not SmolLM2's 49,152-token vocabulary: the models are trained from scratch
in minutes on a CPU, and a 19-symbol vocabulary keeps their embedding and head tiny. The top-k
diagnostics then use a small k (see `run.py`), since k = 16 would cover most of the vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

Tokenization = Literal["shared", "two-digit"]
TOKENIZATIONS: tuple[Tokenization, ...] = ("shared", "two-digit")

PAD, EOS, USER, ASSISTANT = "<pad>", "<eos>", "<q>", "<a>"
SPECIAL = (PAD, EOS, USER, ASSISTANT)
CHARS = tuple("0123456789+=|;>")


def _template(user: str, assistant: str, end: str) -> str:
    """A user turn is {user}text, an assistant turn {assistant}text{end}; the generation
    prompt opens {assistant}."""
    return (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}" + assistant
        + "{{ m['content'] }}" + end + "{% else %}" + user + "{{ m['content'] }}{% endif %}"
        + "{% endfor %}{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )  # fmt: skip


CHAT_TEMPLATE = _template(USER, ASSISTANT, EOS)

# The two-digit tokenization's own specials and template.
PAD2, EOS2, USER2, ASSISTANT2 = "[pad]", "[end]", "[user]", "[bot]"
PAIRS = tuple(f"{i:02d}" for i in range(100))
CHAT_TEMPLATE2 = _template(USER2, ASSISTANT2, EOS2)


def _fast(
    vocab: list[str], split: str, specials: tuple[str, str, str, str], template: str
) -> PreTrainedTokenizerFast:
    """A WordLevel fast tokenizer over `vocab` (ids in its order), the text pre-split by the
    regex `split` (leftmost match first), decoded by joining the tokens."""
    pad, eos, user, assistant = specials
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=pad))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(split), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos,
        pad_token=pad,
        unk_token=pad,
        additional_special_tokens=[user, assistant],
        chat_template=template,
        model_max_length=128,
    )


def build_tokenizer(tokenization: Tokenization = "shared") -> PreTrainedTokenizerFast:
    """A tokenizer built in memory. "shared": one id per character, the 4 specials first.
    "two-digit": the 100 digit pairs first, then the characters, then its 4 specials; a digit
    pair is one token wherever two digits follow each other, taken from the left."""
    if tokenization == "shared":
        return _fast([*SPECIAL, *CHARS], ".", SPECIAL, CHAT_TEMPLATE)
    if tokenization == "two-digit":
        specials = (PAD2, EOS2, USER2, ASSISTANT2)
        return _fast([*PAIRS, *CHARS, *specials], "[0-9]{2}|.", specials, CHAT_TEMPLATE2)
    raise ValueError(f"unknown tokenization {tokenization!r}; one of {', '.join(TOKENIZATIONS)}")


def save_tokenizer(path: Path, tokenization: Tokenization = "shared") -> PreTrainedTokenizerFast:
    """build_tokenizer(tokenization), saved as an HF folder (tokenizer.json and its config)."""
    tokenizer = build_tokenizer(tokenization)
    tokenizer.save_pretrained(path)
    return tokenizer
