"""The prefix hash that keys model topics, so the same conversation lands on the same worker."""

from __future__ import annotations

import hashlib

import orjson

from schemas.request import InferenceRequest

# For a bare prompt there are no turns to split on: its head stands in for the stable prefix.
PROMPT_PREFIX_CHARS = 512


def prefix_material(request: InferenceRequest) -> bytes:
    """The bytes that identify what a worker's KV cache can reuse for this request."""
    if request.prefix_key is not None:
        return b"session\0" + request.prefix_key.encode()
    if request.messages is not None:
        # vLLM reuses KV blocks of the system prompt and the conversation so far; the last
        # turn is new. A one-message request has no history, so it is keyed by itself,
        # which spreads unrelated single-turn requests instead of piling them on one key.
        stable = request.messages[:-1] or request.messages
        return b"chat\0" + orjson.dumps([[m.role, m.content] for m in stable])
    assert request.prompt is not None
    return b"prompt\0" + request.prompt[:PROMPT_PREFIX_CHARS].encode()


def prefix_hash(request: InferenceRequest) -> str:
    """A 128-bit hex digest of the tenant and the request's stable prefix."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(request.tenant.encode() + b"\0")
    digest.update(prefix_material(request))
    return digest.hexdigest()
