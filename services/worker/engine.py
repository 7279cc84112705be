"""The vLLM engine behind a worker: renders a request to tokens and runs it with continuous batching.

AsyncLLM batches every request in flight on each step, so the worker's job is to keep many
requests submitted at once; this module turns one request into one completion and reports
the token counts, prefix-cache reuse and time to first token that billing and metrics need.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from schemas.request import InferenceRequest
from services.worker import metrics
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
    name: str | None = None  # the model's name in the policy, for metrics; the folder's name if unset

    @property
    def label(self) -> str:
        return self.name or self.model_path.name


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    tokens_in: int
    tokens_out: int
    cached_tokens: int
    ttft_ms: int | None
    # The geometric mean of the sampled tokens' probabilities (exp of their mean log-probability),
    # where the backend reports log-probabilities; None otherwise.
    confidence: float | None = None
    # True when the deadline passed during generation: the text is what came before it, and
    # the counts are what ran (and is billed).
    expired: bool = False


OnText = Callable[[str], Awaitable[None]]


class Backend(Protocol):
    """What a worker drives: the vLLM engine, or a provider API (services/worker/provider.py).

    `run` raises a SwitchyardError subclass when it cannot answer: InputTooLarge (caller's fault),
    EngineError (this request failed), EngineDead (nothing more can run here: fatal), or one
    whose `moves_on` is set (ProviderUnavailable: the next model of the chain should take it)."""

    async def run(self, request: InferenceRequest, *, request_id: str, max_tokens: int,
                  deadline_ms: int | None = None, on_text: OnText | None = None) -> Completion: ...

    def load(self) -> dict[str, float | None]:
        """What the load report carries from the backend: {"kv_usage": share or None}."""
        ...

    def shutdown(self) -> None: ...


def confidence_of(logprobs: list[float]) -> float | None:
    """exp(mean log-probability) of the sampled tokens, in [0, 1]; None without tokens."""
    finite = [lp for lp in logprobs if lp is not None and math.isfinite(lp)]
    if not finite:
        return None
    return min(1.0, max(0.0, math.exp(sum(finite) / len(finite))))


def seconds_until(deadline_ms: int | None) -> float | None:
    if deadline_ms is None:
        return None
    return max(0.0, deadline_ms / 1000 - time.time())


class _KvUsage:
    """A vLLM stat logger for one engine: keeps the last KV-cache usage the scheduler reported for
    the load report, and feeds the batch-size histogram and KV gauge."""

    def __init__(self, model: str = ""):
        self.usage: float | None = None
        self._batch = metrics.ENGINE_BATCH.labels(model)
        self._kv = metrics.KV_USAGE.labels(model)

    def factory(self, vllm_config=None, engine_index: int = 0) -> _KvUsage:
        return self

    def record(self, scheduler_stats=None, iteration_stats=None, *args, **kwargs) -> None:
        if scheduler_stats is not None:
            usage = getattr(scheduler_stats, "kv_cache_usage", None)
            if usage is None:
                usage = getattr(scheduler_stats, "gpu_cache_usage", None)
            if usage is not None:
                self.usage = float(usage)
                self._kv.set(self.usage)
            running = getattr(scheduler_stats, "num_running_reqs", None)
            if running:
                self._batch.observe(running)

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *args, **kwargs) -> None:
        pass


class Engine:
    """One vLLM AsyncLLM and the tokenizer that renders chat requests for it."""

    def __init__(self, llm, tokenizer, config: EngineConfig, kv: _KvUsage | None = None):
        self._llm = llm
        self._kv = kv or _KvUsage()
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
            disable_log_stats=False,  # the scheduler's stats feed the load report's KV usage
        )
        started = time.monotonic()
        kv = _KvUsage(config.label)
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[kv.factory])
        log.info("engine for %s ready in %.1f s", config.model_path.name, time.monotonic() - started)
        tokenizer = AutoTokenizer.from_pretrained(str(config.model_path))
        return cls(llm, tokenizer, config, kv)

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

    async def run(self, request: InferenceRequest, *, request_id: str, max_tokens: int,
                  deadline_ms: int | None = None, on_text: OnText | None = None) -> Completion:
        """Render and run one request to its end, or to its deadline (then `expired`, with what ran)."""
        prompt_ids = self.render(request)
        return await self.complete(request_id, prompt_ids, request, max_tokens, deadline_ms=deadline_ms,
                                   on_text=on_text)

    async def complete(self, request_id: str, prompt_ids: list[int], request: InferenceRequest,
                       max_tokens: int, *, deadline_ms: int | None = None, on_text: OnText | None = None) -> Completion:
        """Run one request's tokens; raises EngineError if the engine fails on it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        sampling = request.sampling
        started = time.monotonic()
        ttft_ms = None
        final = None
        expired = False
        sent = 0
        try:
            params = SamplingParams(
                max_tokens=min(max_tokens, self.config.max_model_len - len(prompt_ids)),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                stop=sampling.stop or None,
                seed=sampling.seed,
                min_tokens=1,
                logprobs=0,  # the sampled token's own log-probability: the answer's confidence
            )
            try:
                async with asyncio.timeout(seconds_until(deadline_ms)):
                    async for output in self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                                           request_id):
                        if ttft_ms is None and output.outputs and output.outputs[0].token_ids:
                            ttft_ms = int((time.monotonic() - started) * 1000)
                        final = output
                        if on_text is not None and output.outputs and len(output.outputs[0].text) > sent:
                            text = output.outputs[0].text
                            await on_text(text[sent:])
                            sent = len(text)
            except TimeoutError:
                # Leaving generate() aborts the request inside vLLM: its KV blocks are freed now.
                expired = True
        except EngineDeadError as exc:
            raise EngineDead(f"the engine for {self.config.model_path.name} died: {exc}") from exc
        except Exception as exc:  # vLLM raises its own types, and ValueError for bad parameters
            raise EngineError(f"engine failed on request {request_id}: {exc}") from exc
        if expired and (final is None or not final.outputs):
            return Completion(text="", finish_reason="deadline", tokens_in=len(prompt_ids), tokens_out=0,
                              cached_tokens=0, ttft_ms=None, expired=True)
        if final is None or not final.outputs:
            raise EngineError(f"engine returned no output for request {request_id}")
        choice = final.outputs[0]
        confidence = None
        if choice.token_ids and choice.cumulative_logprob is not None:
            confidence = confidence_of([choice.cumulative_logprob / len(choice.token_ids)])
        return Completion(
            text=choice.text,
            finish_reason="deadline" if expired else choice.finish_reason,
            tokens_in=len(prompt_ids),
            tokens_out=len(choice.token_ids),
            cached_tokens=final.num_cached_tokens or 0,
            ttft_ms=ttft_ms,
            confidence=confidence,
            expired=expired,
        )

    def load(self) -> dict[str, float | None]:
        return {"kv_usage": self._kv.usage}

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            # AsyncLLM.__del__ calls shutdown() again, at interpreter exit, when the module
            # globals it needs are gone and it prints a traceback; once is enough.
            self._llm.shutdown = lambda *args, **kwargs: None
            self._llm = None
