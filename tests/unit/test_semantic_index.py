"""The router's semantic cache index: threshold, namespaces, bounded size, expiry."""

import time

import numpy as np

from schemas import InferenceResult
from shared.codec import encode
from shared.semantic import SemanticIndex, pack, unpack


def unit(*values):
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def result(text):
    return encode(InferenceResult(request_id=f"r-{text}", tenant="t", route="c", status="ok", output=text))


def test_a_close_enough_conversation_hits_and_a_farther_one_misses():
    index = SemanticIndex(redis=None)
    index.add("c:t", unit(1, 0, 0), result("paris"), time.time() + 60, max_entries=10)
    hit = index.lookup("c:t", unit(1, 0.2, 0), threshold=0.95)
    assert hit is not None and hit[0].output == "paris" and hit[1] > 0.95
    assert index.lookup("c:t", unit(1, 0.5, 0), threshold=0.95) is None
    assert index.lookup("c:other-tenant", unit(1, 0, 0), threshold=0.5) is None


def test_expired_entries_never_answer():
    index = SemanticIndex(redis=None)
    index.add("c:t", unit(1, 0), result("old"), time.time() - 1, max_entries=10)
    assert index.lookup("c:t", unit(1, 0), threshold=0.5) is None


def test_size_is_bounded_and_the_oldest_entries_go_first():
    index = SemanticIndex(redis=None)
    for i in range(25):
        index.add("c:t", unit(1, i, 0.5), result(str(i)), time.time() + 60, max_entries=10)
    assert index.size("c:t") == 10
    assert index.lookup("c:t", unit(1, 0, 0.5), threshold=0.9999) is None  # entry 0 was evicted
    assert index.lookup("c:t", unit(1, 24, 0.5), threshold=0.9999)[0].output == "24"
    # A smaller bound from a policy change keeps the newest entries.
    index.add("c:t", unit(0, 0, 1), result("z"), time.time() + 60, max_entries=3)
    assert index.size("c:t") == 3
    assert index.lookup("c:t", unit(1, 23, 0.5), threshold=0.9999)[0].output == "23"


def test_embeddings_travel_as_float16_and_come_back_unit_length():
    v = unit(*np.random.default_rng(1).normal(size=384))
    back = unpack(pack(v))
    assert abs(float(np.linalg.norm(back)) - 1) < 1e-5
    assert float(back @ v) > 0.9999
