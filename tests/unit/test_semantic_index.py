"""The router's semantic cache index: threshold, namespaces, guard signatures, bounded size, expiry."""

import time

import numpy as np
import pytest

from schemas import InferenceResult
from shared.codec import encode
from shared import semantic
from shared.semantic import SemanticIndex, pack, unpack


SIG = "0123456789abcdef"


def unit(*values):
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def result(text):
    return encode(InferenceResult(request_id=f"r-{text}", tenant="t", route="c", status="ok", output=text))


def test_a_close_enough_conversation_hits_and_a_farther_one_misses():
    index = SemanticIndex(redis=None)
    index.add("c:t", unit(1, 0, 0), result("paris"), time.time() + 60, max_entries=10, signature=SIG)
    hit = index.lookup("c:t", unit(1, 0.2, 0), threshold=0.95, signature=SIG)
    assert hit is not None and hit[0].output == "paris" and hit[1] > 0.95
    assert index.lookup("c:t", unit(1, 0.5, 0), threshold=0.95, signature=SIG) is None
    assert index.lookup("c:other-tenant", unit(1, 0, 0), threshold=0.5, signature=SIG) is None


def test_an_entry_answers_only_a_conversation_with_the_same_guard_signature():
    index = SemanticIndex(redis=None)
    index.add("c:t", unit(1, 0, 0), result("15% of 80 is 12"), time.time() + 60, max_entries=10, signature=SIG)
    index.add("c:t", unit(1, 0.1, 0), result("15% of 60 is 9"), time.time() + 60, max_entries=10,
              signature="fedcba9876543210")
    assert index.lookup("c:t", unit(1, 0, 0), threshold=0.9, signature="fedcba9876543210")[0].output == "15% of 60 is 9"
    assert index.lookup("c:t", unit(1, 0.1, 0), threshold=0.9, signature=SIG)[0].output == "15% of 80 is 12"
    assert index.lookup("c:t", unit(1, 0, 0), threshold=0.9, signature="00000000000000ff") is None


def test_expired_entries_never_answer():
    index = SemanticIndex(redis=None)
    index.add("c:t", unit(1, 0), result("old"), time.time() - 1, max_entries=10, signature=SIG)
    assert index.lookup("c:t", unit(1, 0), threshold=0.5, signature=SIG) is None


def test_size_is_bounded_and_the_oldest_entries_go_first():
    index = SemanticIndex(redis=None)
    for i in range(25):
        index.add("c:t", unit(1, i, 0.5), result(str(i)), time.time() + 60, max_entries=10, signature=SIG)
    assert index.size("c:t") == 10
    assert index.lookup("c:t", unit(1, 0, 0.5), threshold=0.9999, signature=SIG) is None  # entry 0 was evicted
    assert index.lookup("c:t", unit(1, 24, 0.5), threshold=0.9999, signature=SIG)[0].output == "24"
    # A smaller bound from a policy change keeps the newest entries.
    index.add("c:t", unit(0, 0, 1), result("z"), time.time() + 60, max_entries=3, signature=SIG)
    assert index.size("c:t") == 3
    assert index.lookup("c:t", unit(1, 23, 0.5), threshold=0.9999, signature=SIG)[0].output == "23"


def test_embeddings_travel_as_float16_and_come_back_unit_length():
    v = unit(*np.random.default_rng(1).normal(size=384))
    back = unpack(pack(v))
    assert abs(float(np.linalg.norm(back)) - 1) < 1e-5
    assert float(back @ v) > 0.9999


def test_a_batch_lookup_answers_each_query_as_a_single_lookup_would(monkeypatch):
    import shared.semantic

    monkeypatch.setattr(shared.semantic, "SCORES_MAX", 7)  # several chunks of queries
    rng = np.random.default_rng(3)
    index = SemanticIndex(redis=None)
    entries = rng.standard_normal((20, 8)).astype(np.float32)
    entries /= np.linalg.norm(entries, axis=1, keepdims=True)
    sigs = [f"{i % 3:016x}" for i in range(20)]
    for i, vector in enumerate(entries):
        index.add("c:t", vector, result(str(i)), time.time() + (60 if i != 5 else -1), max_entries=50, signature=sigs[i])
    queries = entries + 0.05 * rng.standard_normal(entries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    query_sigs = [sigs[i] if i % 4 else f"{7:016x}" for i in range(20)]
    many = index.lookup_many("c:t", queries, 0.9, query_sigs)
    single = [index.lookup("c:t", q, 0.9, s) for q, s in zip(queries, query_sigs)]
    assert [m and m[0].output for m in many] == [s and s[0].output for s in single]
    assert many[1][0].output == "1" and many[0] is None and many[5] is None  # wrong signature; expired


def test_a_lookup_scores_only_its_signature_and_finds_what_a_scan_of_the_whole_ring_finds(monkeypatch):
    import shared.semantic

    rng = np.random.default_rng(11)
    entries = rng.standard_normal((400, 16)).astype(np.float32)
    entries /= np.linalg.norm(entries, axis=1, keepdims=True)
    # Signature 0 is held by most entries (texts without numbers or names), the rest by a few each;
    # the ring of 300 evicts the first 100, whose slots change signature.
    sigs = [f"{0 if i % 4 else 1 + i % 37:016x}" for i in range(400)]
    expires = [time.time() + (-1 if i % 29 == 0 else 60) for i in range(400)]
    queries = entries[50:] + 0.1 * rng.standard_normal((350, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    query_sigs = sigs[50:]

    def lookups(bucket_max):
        monkeypatch.setattr(shared.semantic, "BUCKET_MAX", bucket_max)
        index = SemanticIndex(redis=None)
        for i in range(400):
            index.add("c:t", entries[i], result(str(i)), expires[i], max_entries=300, signature=sigs[i])
        return [m and (m[0].output, m[1]) for m in index.lookup_many("c:t", queries, 0.8, query_sigs)]

    scanned = lookups(10**9)  # every query scored against its signature's entries only
    whole = lookups(0)  # every query through one product over the whole ring
    assert [m and m[0] for m in scanned] == [m and m[0] for m in whole]
    assert [m and m[1] for m in scanned] == pytest.approx([m and m[1] for m in whole], abs=1e-5)
    found = [m for m in scanned if m]
    assert len(found) > 100
    # Evicted entries (0-99) and expired ones never answer.
    assert all(int(out) >= 100 and int(out) % 29 for out, _ in found)


def test_the_blas_controller_is_found_with_the_index_not_on_the_first_lookup(monkeypatch):
    # Finding it scans every library loaded in the process: a router's first semantic lookup waited for that.
    monkeypatch.setattr(semantic, "_BLAS", None)
    index = SemanticIndex(redis=None)
    found = semantic._BLAS
    assert found is not None
    index.add("c:t", unit(1, 0, 0), result("paris"), time.time() + 60, max_entries=10, signature=SIG)
    assert index.lookup("c:t", unit(1, 0.2, 0), threshold=0.95, signature=SIG) is not None
    assert semantic._BLAS is found
