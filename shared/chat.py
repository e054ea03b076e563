"""How a prompt becomes a user turn: one rendering, used by the trainer, the recipes and the
server's /v1/generate, so that a prompt means the same tokens wherever it is sent.

Takes any HF-style tokenizer object (duck-typed: no transformers import here).
"""

from __future__ import annotations

from typing import Any


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of `prompt` as a user turn with the assistant turn opened (chat template).

    Without a chat template the plain text is tokenized with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])
