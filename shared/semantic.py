"""The semantic cache: answers a request from an earlier result whose conversation means the same.

Workers publish each ok result of a route that opts in to a Redis stream, with the embedding the
router computed for its conversation and the namespace it belongs to (route and tenant, or route
alone when the route shares its cache). Every router replays the stream when it starts and then
follows it, keeping an in-memory index per namespace: a ring of at most `max_entries` unit
vectors (the oldest entry is evicted first), each with its expiry. A hit needs the route's cosine
threshold, an unexpired entry and the same guard signature (shared.semantic_guard: the numbers,
negations and identifiers both texts must share, which embeddings blur), so a lookup scores only
the entries with the request's signature. The stream itself is capped, so Redis holds a bounded
amount.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import InferenceResult
from shared.metrics import RedisDegraded

log = logging.getLogger(__name__)

STREAM = "switchyard:semantic"
STREAM_MAX = 200_000
SCORES_MAX = 4_000_000  # similarity values computed at once in a batch lookup (16 MB)
# A signature held by more entries than this is scored with one product over the whole ring,
# cheaper then than gathering its entries' rows.
BUCKET_MAX = 256


def pack(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype(np.float16).tobytes()).decode()


def unpack(text: str | bytes) -> np.ndarray:
    vector = np.frombuffer(base64.b64decode(text), dtype=np.float16).astype(np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class _Ring:
    """A namespace's entries, and which slots hold each guard signature: a hit needs the same
    signature, so a query is scored against the entries of its signature only (most often a
    handful), not against the whole ring."""

    def __init__(self, capacity: int, dimensions: int):
        self.capacity = capacity
        self.vectors = np.zeros((capacity, dimensions), dtype=np.float32)
        self.expires = np.zeros(capacity, dtype=np.float64)
        self.signatures = np.zeros(capacity, dtype=np.uint64)
        self.results: list[bytes | None] = [None] * capacity
        self.count = 0  # entries ever added; the next goes to count % capacity
        self.slots: dict[int, set[int]] = {}  # signature -> the slots holding it

    def add(self, vector: np.ndarray, result: bytes, expires: float, signature: int) -> None:
        slot = self.count % self.capacity
        if self.count >= self.capacity:  # evicting the oldest entry
            old = int(self.signatures[slot])
            holders = self.slots[old]
            holders.discard(slot)
            if not holders:
                del self.slots[old]
        self.vectors[slot] = vector
        self.expires[slot] = expires
        self.signatures[slot] = signature
        self.results[slot] = result
        self.slots.setdefault(signature, set()).add(slot)
        self.count += 1

    def resized(self, capacity: int) -> _Ring:
        ring = _Ring(capacity, self.vectors.shape[1])
        live = min(self.count, self.capacity)
        for k in range(max(0, self.count - min(live, capacity)), self.count):
            slot = k % self.capacity
            ring.add(self.vectors[slot], self.results[slot], self.expires[slot], int(self.signatures[slot]))
        return ring

    def best(self, vectors: np.ndarray, now: float, signatures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row of `vectors` (k × d) with its signature: the best score and its slot (-1: none)."""
        scores = np.full(len(vectors), -1.0)
        slots = np.full(len(vectors), -1)
        crowded = []  # queries whose signature many entries share: one product over the ring for them
        for i, sig in enumerate(signatures.tolist()):
            holders = self.slots.get(sig)
            if not holders:
                continue
            if len(holders) > BUCKET_MAX:
                crowded.append(i)
                continue
            held = np.fromiter(holders, dtype=np.intp, count=len(holders))
            held.sort()
            mine = self.vectors[held] @ vectors[i]
            mine[self.expires[held] <= now] = -1.0
            j = int(np.argmax(mine))
            scores[i], slots[i] = mine[j], held[j]
        if crowded:
            live = min(self.count, self.capacity)
            chosen = np.asarray(crowded)
            # One matrix product for those queries: the entries are read once, not once per request.
            product = self.vectors[:live] @ vectors[chosen].T
            product[(self.expires[:live] <= now)[:, None]
                    | (self.signatures[:live, None] != signatures[chosen][None, :])] = -1.0
            best = np.argmax(product, axis=0)
            scores[chosen], slots[chosen] = product[best, np.arange(len(chosen))], best
        return scores, slots


class SemanticIndex:
    """A router's copy of the semantic cache."""

    degraded = RedisDegraded("semantic_index")

    def __init__(self, redis: Redis, *, stream: str = STREAM):
        self._redis = redis
        self._stream = stream
        self._rings: dict[str, _Ring] = {}
        self._last_id = "0-0"
        self._task: asyncio.Task | None = None
        self.entries_seen = 0
        self.degraded = False
        _blas()

    def add(self, namespace: str, vector: np.ndarray, result: bytes, expires: float, max_entries: int,
            signature: str) -> None:
        ring = self._rings.get(namespace)
        if ring is None:
            ring = self._rings[namespace] = _Ring(max_entries, len(vector))
        elif ring.capacity != max_entries:
            ring = self._rings[namespace] = ring.resized(max_entries)
        ring.add(vector, result, expires, _as_int(signature))
        self.entries_seen += 1

    def lookup(self, namespace: str, vector: np.ndarray, threshold: float,
               signature: str) -> tuple[InferenceResult, float] | None:
        """The closest unexpired entry at or over `threshold` whose guard signature is `signature`."""
        return self.lookup_many(namespace, vector[None, :], threshold, [signature])[0]

    def lookup_many(self, namespace: str, vectors: np.ndarray, threshold: float,
                    signatures: list[str]) -> list[tuple[InferenceResult, float] | None]:
        """lookup() for each row of `vectors` with its signature, in one pass over the namespace."""
        ring = self._rings.get(namespace)
        if ring is None:
            return [None] * len(vectors)
        wanted = np.array([_as_int(s) for s in signatures], dtype=np.uint64)
        with _one_blas_thread():
            return self._lookup_chunks(ring, vectors, threshold, wanted, time.time())

    @staticmethod
    def _lookup_chunks(ring: _Ring, vectors: np.ndarray, threshold: float, wanted: np.ndarray,
                       now: float) -> list[tuple[InferenceResult, float] | None]:
        out = []
        # Queries in chunks, so the scores matrix (entries × queries) stays within SCORES_MAX values.
        step = max(1, SCORES_MAX // max(1, min(ring.count, ring.capacity)))
        for start in range(0, len(vectors), step):
            scores, slots = ring.best(vectors[start:start + step], now, wanted[start:start + step])
            out += [None if score < threshold or score < 0 else
                    (InferenceResult.model_validate_json(ring.results[slot]), float(score))
                    for score, slot in zip(scores.tolist(), slots.tolist())]
        return out

    def size(self, namespace: str) -> int:
        ring = self._rings.get(namespace)
        return 0 if ring is None else min(ring.count, ring.capacity)

    async def start(self) -> None:
        """Load what the stream holds, then follow it in the background."""
        await self._read(block_ms=None)
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        while True:
            try:
                await self._read(block_ms=1000)
                self.degraded = False
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if not self.degraded:
                    log.warning("semantic cache: cannot read the stream (%s); retrying every second", exc)
                self.degraded = True
                await asyncio.sleep(1)

    async def _read(self, block_ms: int | None) -> None:
        while True:
            reply = await self._redis.xread({self._stream: self._last_id}, count=1000, block=block_ms)
            if not reply:
                return
            skipped = []
            for _, entries in reply:
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    try:
                        self.add(fields[b"ns"].decode(), unpack(fields[b"emb"]), fields[b"result"],
                                 float(fields[b"exp"]), int(fields[b"max"]), fields[b"sig"].decode())
                    except (KeyError, ValueError) as exc:  # bad, or written before entries had signatures
                        skipped.append((entry_id, exc))
            if skipped:
                log.warning("semantic cache: skipped %d bad entries (first %s: %r)", len(skipped), *skipped[0])
            if block_ms is not None:
                return


_BLAS = None


def _one_blas_thread():
    """numpy's BLAS on one thread for lookups: its threads spin for a while after each product,
    which cost the router more CPU than the products themselves between small batches (and the
    cores are the broker's and the workers' too)."""
    return _blas().limit(limits=1)


def _blas():
    """The controller of numpy's OpenBLAS, found once: finding it scans every library loaded in the
    process (5 ms here, more beside torch), which the first lookup must not wait for."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController().select(internal_api="openblas")
    return _BLAS


def _as_int(signature: str) -> int:
    """A signature (hex) as the ring keeps it: its first 64 bits."""
    return int(signature[:16], 16)


async def publish(redis: Redis, namespace: str, embedding: str, signature: str, result: bytes, ttl_s: int,
                  max_entries: int, *, stream: str = STREAM) -> None:
    """A worker's part: offer an ok result to every router's index."""
    await redis.xadd(stream, {"ns": namespace, "emb": embedding, "sig": signature, "result": result,
                              "exp": f"{time.time() + ttl_s:.3f}", "max": str(max_entries)},
                     maxlen=STREAM_MAX, approximate=True)
