"""The vLLM engine behind a worker: renders a request to tokens and runs it with continuous batching.

AsyncLLM batches every request in flight on each step, so the worker's job is to keep many
requests submitted at once; this module turns one request into one completion and reports
the token counts, prefix-cache reuse and time to first token that billing and metrics need.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.request import InferenceRequest
from shared.errors import ConfigError, EngineDead, EngineError, InputTooLarge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    max_model_len: int = 2048
    max_num_seqs: int = 64
    kv_cache_gib: int = 1
    enable_prefix_caching: bool = True
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    tokens_in: int
    tokens_out: int
    cached_tokens: int
    ttft_ms: int | None


class Engine:
    """One vLLM AsyncLLM and the tokenizer that renders chat requests for it."""

    def __init__(self, llm, tokenizer, config: EngineConfig):
        self._llm = llm
        self._tokenizer = tokenizer
        self.config = config

    @classmethod
    def start(cls, config: EngineConfig) -> Engine:
        """Build the engine (tens of seconds on a CPU). Call from inside the running event loop."""
        if not (config.model_path / "config.json").exists():
            raise ConfigError(f"no model at {config.model_path} (config.json missing); "
                              f"make a tiny one with `switchyard model tiny {config.model_path}`")
        # vLLM's CPU backend sizes its KV cache from this variable, not from engine args.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(config.model_path),
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            seed=config.seed,
            disable_log_stats=True,
        )
        started = time.monotonic()
        llm = AsyncLLM.from_engine_args(args)
        log.info("engine for %s ready in %.1f s", config.model_path.name, time.monotonic() - started)
        tokenizer = AutoTokenizer.from_pretrained(str(config.model_path))
        return cls(llm, tokenizer, config)

    def render(self, request: InferenceRequest) -> list[int]:
        """The prompt token ids: the chat template applied to messages, or the prompt encoded."""
        try:
            if request.messages is not None:
                ids = self._tokenizer.apply_chat_template(
                    [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=True
                )
                # transformers 5 returns a BatchEncoding here; older versions a plain list.
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = self._tokenizer.encode(request.prompt)
        except Exception as exc:  # a template or tokenizer failing on this request's content
            raise EngineError(f"could not render the prompt: {exc}") from exc
        if len(ids) >= self.config.max_model_len:
            raise InputTooLarge(
                f"the prompt is {len(ids)} tokens; this model's context is {self.config.max_model_len}"
            )
        return ids

    async def complete(self, request_id: str, prompt_ids: list[int], request: InferenceRequest,
                       max_tokens: int) -> Completion:
        """Run one request to its end; raises EngineError if the engine fails on it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        sampling = request.sampling
        started = time.monotonic()
        ttft_ms = None
        final = None
        try:
            params = SamplingParams(
                max_tokens=min(max_tokens, self.config.max_model_len - len(prompt_ids)),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop=sampling.stop or None,
                seed=sampling.seed,
                min_tokens=1,
            )
            async for output in self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
                if ttft_ms is None and output.outputs and output.outputs[0].token_ids:
                    ttft_ms = int((time.monotonic() - started) * 1000)
                final = output
        except EngineDeadError as exc:
            raise EngineDead(f"the engine for {self.config.model_path.name} died: {exc}") from exc
        except Exception as exc:  # vLLM raises its own types, and ValueError for bad parameters
            raise EngineError(f"engine failed on request {request_id}: {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError(f"engine returned no output for request {request_id}")
        choice = final.outputs[0]
        return Completion(
            text=choice.text,
            finish_reason=choice.finish_reason,
            tokens_in=len(prompt_ids),
            tokens_out=len(choice.token_ids),
            cached_tokens=final.num_cached_tokens or 0,
            ttft_ms=ttft_ms,
        )

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            # AsyncLLM.__del__ calls shutdown() again, at interpreter exit, when the module
            # globals it needs are gone and it prints a traceback; once is enough.
            self._llm.shutdown = lambda *args, **kwargs: None
            self._llm = None
