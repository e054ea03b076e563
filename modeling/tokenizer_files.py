"""A tokenizer as text files, both ways: what GET /v1/tokenizer hands out and what the student
side rebuilds from it (cross-tokenizer OPD, opd.client.train.cross_tokenizer).

Why files and not a tokenize route: the student needs the teacher's tokenizer at every step
(render each episode with the teacher's chat template, tokenize the student's text with
offsets) and once per pair for the vocabulary map; with the files it does all of it locally,
with no round trip per step and no tokenizer work on the teacher's CPU. Only text files travel
(tokenizer.json, tokenizer_config.json, a chat template): nothing is unpickled, and
transformers loads them without remote code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

# What a fast tokenizer's save_pretrained writes that the rebuilt tokenizer needs.
_TEXT_SUFFIXES = (".json", ".jinja", ".txt")
# transformers' file names; anything else in a save (a sentencepiece .model) is left out.
REQUIRED_FILE = "tokenizer.json"


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The text files of a fast tokenizer (name -> text), as save_pretrained writes them.

    ValueError when there is no tokenizer.json: a slow tokenizer has no offsets, which
    cross-tokenizer alignment needs."""
    with tempfile.TemporaryDirectory(prefix="opd-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {
            p.name: p.read_text(encoding="utf-8")
            for p in sorted(Path(tmp).iterdir())
            if p.is_file() and p.suffix in _TEXT_SUFFIXES
        }
    if REQUIRED_FILE not in files:
        raise ValueError(
            "the tokenizer is not a fast tokenizer (no tokenizer.json): cross-tokenizer OPD "
            "needs its character offsets"
        )
    return files


def write_tokenizer_files(files: dict[str, str], folder: str | Path) -> Path:
    """Write `files` into `folder` (plain names only: no path parts) and return it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        if Path(name).name != name or name.startswith(".") or not name.endswith(_TEXT_SUFFIXES):
            raise ValueError(f"files: {name!r} is not a plain tokenizer file name")
        (out / name).write_text(text, encoding="utf-8")
    if not (out / REQUIRED_FILE).is_file():
        raise ValueError(f"files: {REQUIRED_FILE} is missing")
    return out


def load_tokenizer_folder(folder: str | Path) -> Any:
    """A fast tokenizer from a folder of these files (never remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, use_fast=True)
