"""A character-level tokenizer for the replication's models, saved as a standard HF fast
tokenizer with a chat template, so `opd serve`, `opd train` and every recipe load it as they
load any model's tokenizer (and fingerprint it: all the replication's models share it).

Why characters and not SmolLM2's 49,152-token vocabulary: the models are trained from scratch
in minutes on a CPU, and a 19-symbol vocabulary keeps their embedding and head tiny. The top-k
diagnostics then use a small k (see `run.py`), since k = 16 would cover most of the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, USER, ASSISTANT = "<pad>", "<eos>", "<q>", "<a>"
SPECIAL = (PAD, EOS, USER, ASSISTANT)
CHARS = tuple("0123456789+=|;>")
# A user turn is <q>text, an assistant turn <a>text<eos>; the generation prompt opens <a>.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}" + ASSISTANT
    + "{{ m['content'] }}" + EOS + "{% else %}" + USER + "{{ m['content'] }}{% endif %}"
    + "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)  # fmt: skip


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The shared tokenizer: one id per character, the 4 specials first, built in memory."""
    vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
    )


def save_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """build_tokenizer(), saved as an HF folder (tokenizer.json and its config) at `path`."""
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    return tokenizer
