"""A tokenizer as text files (GET /v1/tokenizer's payload): round trip, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.modeling.tokenizer_files import (
    load_tokenizer_folder,
    tokenizer_files,
    write_tokenizer_files,
)
from opd.shared.fingerprint import fingerprint_hf_tokenizer
from tests.support.tokenizers import gpt2_tokenizer


def test_a_fast_tokenizer_round_trips_through_its_files(tmp_path):
    tok = gpt2_tokenizer()
    files = tokenizer_files(tok)
    assert "tokenizer.json" in files and all(isinstance(v, str) for v in files.values())
    rebuilt = load_tokenizer_folder(write_tokenizer_files(files, tmp_path / "t"))
    assert fingerprint_hf_tokenizer(rebuilt) == fingerprint_hf_tokenizer(tok)


class _SlowTokenizer:
    """What a slow (sentencepiece-only) tokenizer saves: no tokenizer.json."""

    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))


def test_a_tokenizer_without_tokenizer_json_is_refused():
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        tokenizer_files(_SlowTokenizer())


@pytest.mark.parametrize("name", ["../escape.json", "sub/dir.json", ".hidden.json", "x.model"])
def test_file_names_with_path_parts_or_other_kinds_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="plain tokenizer file name"):
        write_tokenizer_files({"tokenizer.json": "{}", name: "x"}, tmp_path)
    assert not (tmp_path.parent / "escape.json").exists()
