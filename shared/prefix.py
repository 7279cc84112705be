"""The prefix hash that keys model topics, so the same conversation lands on the same worker."""

from __future__ import annotations

import hashlib

import orjson

from schemas.request import InferenceRequest

# For a bare prompt there are no turns to split on: its head stands in for the stable prefix.
PROMPT_PREFIX_CHARS = 512


def prefix_material(request: InferenceRequest) -> bytes:
    """The bytes that identify the conversation, hence the worker whose KV cache it can reuse."""
    if request.prefix_key is not None:
        return b"session\0" + request.prefix_key.encode()
    if request.messages is not None:
        # The conversation's root: its system prompt and first user turn. Every later turn starts
        # with them, so every turn of a conversation gets the same key and lands where the
        # earlier turns left their KV blocks. (Keying on everything before the last turn would
        # give each turn a new key.) Conversations that only share a system prompt spread out;
        # each worker caches that prompt once.
        root = []
        for message in request.messages:
            root.append(message)
            if message.role != "system":
                break
        return b"chat\0" + orjson.dumps([[m.role, m.content] for m in root])
    assert request.prompt is not None
    return b"prompt\0" + request.prompt[:PROMPT_PREFIX_CHARS].encode()


def prefix_hash(request: InferenceRequest) -> str:
    """A 128-bit hex digest of the tenant and the request's stable prefix."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(request.tenant.encode() + b"\0")
    digest.update(prefix_material(request))
    return digest.hexdigest()
