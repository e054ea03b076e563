"""Tokenizer fingerprint: stable for one tokenizer, changed whenever ids mean other text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from opd.shared.fingerprint import fingerprint_hf_tokenizer, tokenizer_fingerprint

VOCAB = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "Ġthe": 4, "▁a": 5, "日本": 6}
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "additional": ["<x>", "<y>"]}
# The hash of a tiny tokenizer, recorded once: the recipe is part of the protocol.
PINNED = "8a85feb0873b41efd34e4284ed771379f31753e1b59949040e938c923525ede7"
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def base() -> str:
    return tokenizer_fingerprint(VOCAB, SPECIAL, TEMPLATE)


def test_is_a_sha256_hex_digest() -> None:
    fp = base()
    assert len(fp) == 64
    assert int(fp, 16) >= 0
    assert fp == fp.lower()


def test_is_deterministic() -> None:
    assert base() == base()
    assert tokenizer_fingerprint(dict(VOCAB), dict(SPECIAL), str(TEMPLATE)) == base()


def test_pinned_value() -> None:
    """Clients compare this hash with the server's: changing the recipe breaks every client."""
    fp = tokenizer_fingerprint({"a": 0, "b": 1}, {"eos_token": "b"}, "T")
    assert fp == PINNED


def test_insensitive_to_vocab_insertion_order() -> None:
    reversed_vocab = dict(reversed(list(VOCAB.items())))
    assert list(reversed_vocab) != list(VOCAB)
    assert tokenizer_fingerprint(reversed_vocab, SPECIAL, TEMPLATE) == base()


def test_insensitive_to_special_tokens_insertion_order() -> None:
    reordered = {k: SPECIAL[k] for k in reversed(list(SPECIAL))}
    assert tokenizer_fingerprint(VOCAB, reordered, TEMPLATE) == base()
    nested_a = {"map": {"x": 1, "y": 2}, "z": 3}
    nested_b = {"z": 3, "map": {"y": 2, "x": 1}}
    assert tokenizer_fingerprint(VOCAB, nested_a) == tokenizer_fingerprint(VOCAB, nested_b)


def test_changes_when_one_token_id_changes() -> None:
    changed = dict(VOCAB, world=7)
    assert tokenizer_fingerprint(changed, SPECIAL, TEMPLATE) != base()


def test_changes_when_two_ids_are_swapped() -> None:
    swapped = dict(VOCAB, hello=3, world=2)
    assert tokenizer_fingerprint(swapped, SPECIAL, TEMPLATE) != base()


def test_changes_when_a_token_string_changes() -> None:
    changed = dict(VOCAB)
    del changed["hello"]
    changed["Hello"] = 2
    assert tokenizer_fingerprint(changed, SPECIAL, TEMPLATE) != base()


def test_changes_when_a_token_is_added_or_removed() -> None:
    assert tokenizer_fingerprint(dict(VOCAB, extra=7), SPECIAL, TEMPLATE) != base()
    smaller = {k: v for k, v in VOCAB.items() if k != "日本"}
    assert tokenizer_fingerprint(smaller, SPECIAL, TEMPLATE) != base()


@pytest.mark.parametrize(
    "special",
    [
        dict(SPECIAL, eos_token="<s>"),
        dict(SPECIAL, pad_token="</s>"),
        {k: v for k, v in SPECIAL.items() if k != "bos_token"},
        dict(SPECIAL, additional=["<y>", "<x>"]),  # list order is meaningful
        None,
    ],
)
def test_changes_when_a_special_token_changes(special: dict[str, Any] | None) -> None:
    assert tokenizer_fingerprint(VOCAB, special, TEMPLATE) != base()


@pytest.mark.parametrize("template", [TEMPLATE + " ", TEMPLATE.replace("|>", ">"), None])
def test_changes_when_the_chat_template_changes(template: str | None) -> None:
    assert tokenizer_fingerprint(VOCAB, SPECIAL, template) != base()


def test_fields_do_not_bleed_into_each_other() -> None:
    # Moving text between the special tokens and the template must not give the same hash.
    a = tokenizer_fingerprint(VOCAB, {"t": "x"}, "y")
    b = tokenizer_fingerprint(VOCAB, {"t": "xy"}, "")
    assert a != b


# ---- fingerprint_hf_tokenizer ------------------------------------------------------------------


class AddedToken:
    """Like tokenizers.AddedToken: str() is its content."""

    def __init__(self, content: str) -> None:
        self.content = content

    def __str__(self) -> str:
        return self.content


class DuckTokenizer:
    def __init__(
        self,
        vocab: dict[str, int],
        special_tokens_map: dict[str, Any],
        added: dict[int, AddedToken],
        chat_template: str | dict[str, str] | None,
    ) -> None:
        self._vocab = vocab
        self.special_tokens_map = special_tokens_map
        self.added_tokens_decoder = added
        self.chat_template = chat_template

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


class BareTokenizer:
    """Only get_vocab: no special tokens, no added tokens, no template."""

    def get_vocab(self) -> dict[str, int]:
        return dict(VOCAB)


def duck(**overrides: Any) -> DuckTokenizer:
    kwargs: dict[str, Any] = {
        "vocab": dict(VOCAB),
        "special_tokens_map": {"bos_token": "<s>", "eos_token": "</s>"},
        "added": {1: AddedToken("</s>"), 0: AddedToken("<s>")},
        "chat_template": TEMPLATE,
    }
    kwargs.update(overrides)
    return DuckTokenizer(**kwargs)


def test_hf_tokenizer_matches_plain_fingerprint() -> None:
    expected = tokenizer_fingerprint(
        VOCAB,
        {
            "special_tokens_map": {"bos_token": "<s>", "eos_token": "</s>"},
            "added_tokens": [(0, "<s>"), (1, "</s>")],
        },
        TEMPLATE,
    )
    assert fingerprint_hf_tokenizer(duck()) == expected
    assert fingerprint_hf_tokenizer(duck()) == fingerprint_hf_tokenizer(duck())


def test_hf_tokenizer_added_tokens_order_does_not_matter() -> None:
    reordered = duck(added={0: AddedToken("<s>"), 1: AddedToken("</s>")})
    assert fingerprint_hf_tokenizer(reordered) == fingerprint_hf_tokenizer(duck())


def test_hf_tokenizer_changes_with_vocab_special_added_and_template() -> None:
    ref = fingerprint_hf_tokenizer(duck())
    assert fingerprint_hf_tokenizer(duck(vocab=dict(VOCAB, hello=9))) != ref
    assert fingerprint_hf_tokenizer(duck(special_tokens_map={"bos_token": "<s>"})) != ref
    assert fingerprint_hf_tokenizer(duck(added={0: AddedToken("<s>")})) != ref
    assert (
        fingerprint_hf_tokenizer(duck(added={0: AddedToken("<s>"), 2: AddedToken("</s>")})) != ref
    )
    assert fingerprint_hf_tokenizer(duck(chat_template="other")) != ref


def test_hf_tokenizer_with_a_dict_of_chat_templates() -> None:
    templates = {"default": "A", "tool_use": "B"}
    fp = fingerprint_hf_tokenizer(duck(chat_template=templates))
    reordered = fingerprint_hf_tokenizer(duck(chat_template={"tool_use": "B", "default": "A"}))
    assert fp == reordered
    assert fp == tokenizer_fingerprint(
        VOCAB,
        {
            "special_tokens_map": {"bos_token": "<s>", "eos_token": "</s>"},
            "added_tokens": [(0, "<s>"), (1, "</s>")],
        },
        json.dumps(templates, sort_keys=True),
    )
    assert fingerprint_hf_tokenizer(duck(chat_template={"default": "A", "tool_use": "C"})) != fp


def test_hf_tokenizer_with_only_get_vocab() -> None:
    fp = fingerprint_hf_tokenizer(BareTokenizer())
    assert fp == tokenizer_fingerprint(VOCAB, {"special_tokens_map": {}, "added_tokens": []}, None)
    assert fp != fingerprint_hf_tokenizer(duck())
