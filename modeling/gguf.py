"""Any GGUF file as a model folder: converted once into a cached float32 safetensors copy.

transformers reads a GGUF (it dequantises to float32: a conversion took 24 s for SmolLM2-135M
and 90 s for gemma-3-270m on our 2-core VM), but every loader in opd (the hf and vllm backends,
the student) takes a folder, and a folder reloads in seconds. So a GGUF is converted once into
the cache (`cache_root()`), and the folder is what runs. `gguf_tokenizer_dir` converts the
tokenizer alone (no model load; ~30 s for Gemma's 262,144 tokens), for tools and tests that need
only that.

The folder's name is the file's stem, a key of its content and the conversion version, e.g.
`gemma-3-270m-q4_k_m-7846c8794480-v1` (`-tokenizer-v1` for the tokenizer alone). The key hashes
the size and the first and last 16 MiB (the header, all the metadata and both ends of the tensor
data): the same file at any path, or assembled again, maps to the same folder, another file to
another folder, and a file of many GB is not read whole to find its folder.

Concurrent callers (several test workers, replicas sharing a cache) are safe: one takes an
exclusive file lock and converts into a staging folder that is renamed into place with a marker
file written last; the others wait on the lock and then find the finished copy.

The tokenizer's BOS and EOS follow the file. A GGUF says whether text starts with BOS and ends
with EOS (`tokenizer.ggml.add_bos_token`, `add_eos_token`), but the tokenizer transformers
(5.19) builds from it adds neither, whatever the flags say. Gemma needs its `<bos>`: greedy,
gemma-3-270m continued "The capital of France is" with " France. The The The The" without it and
with " the capital of the country of France." with it. So where the built tokenizer does not
do what the flags say, its post-processor is rewritten before it is saved, and the saved
folder is reloaded and checked.
Where the file has no flag the tokenizer is kept as transformers built it; SmolLM2's says
add_bos_token = false and its tokenizer adds nothing, so its copy is unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the conversion's output changes, so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = "1"
DONE_MARKER = ".opd-converted"
_KEY_SPAN = 16 * 1024 * 1024  # bytes hashed at each end of the file
# Copies whose folder names predate this module keep them, so existing caches stay valid: the
# embedded SmolLM2 (opd.modeling.embedded) has always been "SmolLM2-135M-Instruct-v1".
_NAMED = {"387b9780c057": "SmolLM2-135M-Instruct"}  # content_key of its Q4_1 GGUF
_FLAGS = ("add_bos_token", "add_eos_token")


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


def content_key(gguf_path: str | Path) -> str:
    """12 hex digits of sha256 over the file's size and its first and last 16 MiB."""
    path = Path(gguf_path)
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        digest.update(fh.read(_KEY_SPAN))
        if size > _KEY_SPAN:
            fh.seek(max(_KEY_SPAN, size - _KEY_SPAN))
            digest.update(fh.read())
    return digest.hexdigest()[:12]


def model_name(gguf_path: str | Path) -> str:
    """The copy's name: a known model's (see _NAMED), else the file's stem and content key."""
    path = Path(gguf_path)
    key = content_key(path)
    return _NAMED.get(key) or f"{path.stem}-{key}"


def is_converted(path: str | Path) -> bool:
    """True for a finished folder of this module's (it holds the marker file)."""
    return (Path(path) / DONE_MARKER).is_file()


def converted_name(path: str | Path) -> str | None:
    """The name a converted folder's model is served under: its GGUF file's stem (the marker
    records the file), not the cache folder's name with its content key; None for any other
    folder."""
    marker = Path(path) / DONE_MARKER
    if not marker.is_file():
        return None
    source = marker.read_text().strip()
    return Path(source).stem if source else None


def model_folder(path: str, cache_dir: Path | None = None) -> str:
    """A model path as a folder transformers and vLLM load: a `.gguf` file's converted copy
    (once, cached), any other path as it is. Every command that takes a model path calls it."""
    if str(path).lower().endswith(".gguf"):
        return str(gguf_model_dir(path, cache_dir))
    return path


def gguf_model_dir(gguf_path: str | Path, cache_dir: Path | None = None) -> Path:
    """The folder holding the float32 safetensors copy of the GGUF (model and tokenizer),
    converting it on first use."""
    path = _checked(gguf_path)
    name = model_name(path)
    return _converted(path, name, f"{name}-v{CONVERSION_VERSION}", cache_dir, tokenizer_only=False)


def gguf_tokenizer_dir(gguf_path: str | Path, cache_dir: Path | None = None) -> Path:
    """A folder holding the GGUF's tokenizer only (no model load: seconds, not minutes),
    converting it on first use; the model's folder when that is already converted."""
    path = _checked(gguf_path)
    name = model_name(path)
    root = (cache_dir or cache_root()).expanduser()
    full = root / f"{name}-v{CONVERSION_VERSION}"
    if is_converted(full):
        return full
    folder = f"{name}-tokenizer-v{CONVERSION_VERSION}"
    return _converted(path, name, folder, cache_dir, tokenizer_only=True)


def special_token_flags(gguf_path: str | Path) -> dict[str, bool]:
    """The file's add_bos_token / add_eos_token flags; a flag the file does not state is absent."""
    try:  # transformers >= 5 has a metadata reader that skips the vocabulary (~3 s for Gemma's)
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # older transformers: the gguf package's reader (slower: ~15 s for Gemma)
        from gguf import GGUFReader

        fields = GGUFReader(str(gguf_path)).fields
        metadata = {
            key: bool(field.parts[field.data[0]][0])
            for key, field in fields.items()
            if key.startswith("tokenizer.ggml.add_")
        }
    else:
        metadata, _ = read_gguf_metadata(str(gguf_path))
    return {
        flag: bool(metadata[f"tokenizer.ggml.{flag}"])
        for flag in _FLAGS
        if f"tokenizer.ggml.{flag}" in metadata
    }


def _checked(gguf_path: str | Path) -> Path:
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path.resolve()


def _converted(
    gguf_path: Path, name: str, folder: str, cache_dir: Path | None, tokenizer_only: bool
) -> Path:
    """root/folder, converted under the lock into a staging folder renamed into place."""
    root = (cache_dir or cache_root()).expanduser()
    target = root / folder
    if is_converted(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_converted(target):
            return target
        what = "tokenizer of" if tokenizer_only else "model"
        logger.info("converting %s %s from %s into %s (once)", what, name, gguf_path, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            _convert(gguf_path, staging, name, tokenizer_only)
            (staging / DONE_MARKER).write_text(str(gguf_path) + "\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path, name: str, tokenizer_only: bool) -> None:
    """Save the tokenizer (its BOS/EOS following the file's flags) and, unless tokenizer_only,
    the dequantised model as float32 safetensors."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, file = str(gguf_path.parent), gguf_path.name
    flags = special_token_flags(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    if _follow_flags(tokenizer, flags):
        logger.info("%s: tokenizer set to the file's %s", name, flags)
    if not tokenizer_only:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        # save_pretrained refuses a model that still looks quantised; the weights are fp32 now.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.config.name_or_path = name
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    saved = AutoTokenizer.from_pretrained(out_dir)
    wrong = {k: v for k, v in flags.items() if _adds(saved)[k] != v}
    if wrong:
        raise RuntimeError(f"the tokenizer saved from {gguf_path} does not follow {wrong}")


def _adds(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer puts BOS first and EOS last in an encoded text."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "add_bos_token": bos is not None and ids[0] == bos,
        "add_eos_token": eos is not None and ids[-1] == eos,
    }


def _follow_flags(tokenizer, flags: dict[str, bool]) -> bool:
    """Make the fast tokenizer add BOS/EOS as the flags say; False when it already did."""
    current = _adds(tokenizer)
    if all(current[k] == v for k, v in flags.items()):
        return False
    from tokenizers import processors

    want = {**current, **flags}
    bos = (tokenizer.bos_token, tokenizer.bos_token_id) if want["add_bos_token"] else None
    eos = (tokenizer.eos_token, tokenizer.eos_token_id) if want["add_eos_token"] else None
    for token, flag in ((bos, "add_bos_token"), (eos, "add_eos_token")):
        if token is not None and (token[0] is None or token[1] is None):
            raise ValueError(f"the GGUF sets {flag} but its tokenizer has no such token")

    def seq(part: str, type_id: int) -> str:  # the layout transformers' own template uses
        first = f"{bos[0]}:{type_id} " if bos else ""
        last = f" {eos[0]}:{type_id}" if eos else ""
        return f"{first}${part}:{type_id}{last}"

    template = processors.TemplateProcessing(
        single=seq("A", 0),
        pair=f"{seq('A', 0)} {seq('B', 1)}",
        special_tokens=[t for t in (bos, eos) if t is not None],
    )
    backend = tokenizer.backend_tokenizer
    existing = backend.post_processor
    if existing is None or isinstance(existing, processors.TemplateProcessing):
        backend.post_processor = template
    elif not any(current.values()):  # e.g. ByteLevel offset trimming: keep it, add the template
        backend.post_processor = processors.Sequence([existing, template])
    else:
        raise ValueError(f"cannot rewrite the post-processor {existing!r} to follow {flags}")
    return True
