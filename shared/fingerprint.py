"""Tokenizer fingerprint: a hash that differs whenever token ids would mean different text.

A student trained against a teacher that splits text differently gets scores for the wrong
tokens, silently. The service publishes this hash in GET /v1/model and the client refuses a
mismatch before any training. It covers the vocabulary (token -> id), the special tokens and
the chat template; it takes plain Python data so that this module needs no tokenizer library.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def tokenizer_fingerprint(
    vocab: Mapping[str, int],
    special_tokens: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
) -> str:
    """sha256 hex of a canonical JSON of (sorted vocab, special tokens, chat template)."""
    digest = hashlib.sha256()
    digest.update(b"opd-tokenizer-fingerprint-v1\n")
    digest.update(json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))).encode())
    digest.update(b"\n")
    digest.update(json.dumps(special_tokens or {}, sort_keys=True, default=str).encode())
    digest.update(b"\n")
    digest.update((chat_template or "").encode())
    return digest.hexdigest()


def fingerprint_hf_tokenizer(tokenizer: Any) -> str:
    """Fingerprint of a transformers tokenizer (duck-typed: get_vocab, special tokens, template)."""
    special = {
        "special_tokens_map": getattr(tokenizer, "special_tokens_map", {}),
        "added_tokens": sorted(
            (int(i), str(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        ),
    }
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return tokenizer_fingerprint(tokenizer.get_vocab(), special, template)
