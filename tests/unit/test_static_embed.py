"""The static embedder distilled from MiniLM: unit vectors, stable, meaningful, and its table cached."""

import json

import numpy as np
import pytest

from services.router import static_embed
from services.router.static_embed import META, TABLE, StaticEmbedder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real distillation for the whole module (seconds on a CPU)."""
    cache = tmp_path_factory.mktemp("static-embed")
    embedder = StaticEmbedder(cache)
    assert embedder.distil_seconds is not None
    return cache, embedder


def test_cached_says_whether_a_router_would_load_the_table_or_distil_it(built, tmp_path):
    cache, _ = built
    assert static_embed.cached(cache)
    assert not static_embed.cached(tmp_path)
    (tmp_path / META).write_text((cache / META).read_text().replace('"format": 1', '"format": 0'))
    (tmp_path / TABLE).write_bytes((cache / TABLE).read_bytes())
    assert not static_embed.cached(tmp_path)  # made by another method: distilled again


def cos(embedder, a, b):
    va, vb = embedder.embed([a, b])
    return float(va @ vb)


def test_rows_are_unit_length_float32_even_for_texts_without_known_tokens(built):
    _, e = built
    texts = ["How do I reset my password?", "", "   ", "😀😀", "x" * 5000, "naïve café: ÉCOLE!"]
    v = e.embed(texts)
    assert v.shape == (len(texts), e.dimensions) and v.dtype == np.float32
    assert np.all(np.isfinite(v))
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # Empty and unknown-only texts share one fixed vector: equal to each other, unlike a real question.
    assert np.array_equal(v[1], v[2]) and np.array_equal(v[1], v[3])
    assert float(v[0] @ v[1]) < 0.9
    assert e.embed([]).shape == (0, e.dimensions)


def test_identical_texts_embed_identically_within_and_across_batches(built):
    _, e = built
    text = "Summarise this email: the launch moves from September 12 to September 26."
    first = e.embed([text, "something else entirely", text])
    assert np.array_equal(first[0], first[2])
    assert np.array_equal(e.embed([text])[0], first[0])  # now from the remembered word pieces
    assert not np.array_equal(first[0], first[1])


def test_word_pieces_are_those_of_tokenizing_the_whole_text_keeping_its_end(built):
    _, e = built
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(static_embed.model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(static_embed.MAX_TOKENS, direction="left")
    tokenizer.no_padding()  # tokenizer.json pads to 128
    texts = ["user: hi\nassistant: hello!\nuser: foo_bar(baz)->qux?", "a\u00a0b\tc\r\nd", "p\x0cq", "über-cool!!!",
             "日本語のテキスト", "word " * 600 + "and the end", " ".join(f"item_{i}" for i in range(300)), ""]
    assert e._token_ids(texts) == [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]


def test_long_texts_keep_their_end(built):
    cache, _ = built
    e = StaticEmbedder(cache, max_tokens=5)
    ending = " how do I reset my password"
    a, b, c = e.embed(["apples " * 50 + ending, "pears " * 50 + ending,
                       "apples " * 50 + " what is the capital of France"])
    assert np.allclose(a, b)
    assert float(a @ c) < 0.9


def test_a_paraphrase_scores_above_an_unrelated_text(built):
    _, e = built
    for text, paraphrase, unrelated in [
        ("How do I reset my password?", "I forgot my password. How can I set a new one?",
         "What is the capital of Australia?"),
        ("How do I sort a dictionary by value in Python?", "Python: sort a dict by its values",
         "Give me three tips for sleeping better."),
        ("How long does shipping take to Canada?", "What is the delivery time for orders to Canada?",
         "Explain recursion to a beginner."),
    ]:
        near, far = cos(e, text, paraphrase), cos(e, text, unrelated)
        assert near > far + 0.2, (text, near, far)


def test_the_table_is_loaded_not_distilled_the_second_time(built, monkeypatch):
    cache, first = built
    mtimes = {name: (cache / name).stat().st_mtime_ns for name in (TABLE, META)}
    monkeypatch.setattr(static_embed, "distil", lambda *a, **k: pytest.fail("distilled again"))
    second = StaticEmbedder(cache)
    assert second.distil_seconds is None
    assert {name: (cache / name).stat().st_mtime_ns for name in (TABLE, META)} == mtimes
    texts = ["How do I reset my password?", "Convert 100 USD to EUR."]
    assert np.array_equal(second.embed(texts), first.embed(texts))


@pytest.mark.parametrize("spoil", ["model", "method", "dimensions", "table"])
def test_a_cache_that_does_not_match_is_distilled_again(built, tmp_path, monkeypatch, spoil):
    cache, real = built
    for name in (TABLE, META):
        (tmp_path / name).write_bytes((cache / name).read_bytes())
    meta = json.loads((tmp_path / META).read_text())
    dimensions = real.dimensions
    if spoil == "model":
        meta["model_sha256"] = "0" * 64
    elif spoil == "method":
        meta["method"] = "something older"
    elif spoil == "dimensions":
        dimensions = 128
    else:
        np.save(tmp_path / TABLE, np.zeros((10, real.dimensions), np.float16))
    (tmp_path / META).write_text(json.dumps(meta))

    rows = real._table.shape[0]
    fake = np.random.default_rng(0).normal(size=(rows, dimensions)).astype(np.float32)
    calls = []
    monkeypatch.setattr(static_embed, "distil", lambda path, dims, threads=None: calls.append(dims) or fake)
    rebuilt = StaticEmbedder(tmp_path, dimensions=dimensions)
    assert calls == [dimensions] and rebuilt.distil_seconds is not None
    assert np.allclose(rebuilt._table, fake, atol=1e-2)

    # What was written is what the next start loads.
    monkeypatch.setattr(static_embed, "distil", lambda *a, **k: pytest.fail("distilled again"))
    again = StaticEmbedder(tmp_path, dimensions=dimensions)
    assert again.distil_seconds is None and np.array_equal(again._table, rebuilt._table)
    stored = json.loads((tmp_path / META).read_text())
    assert stored["dimensions"] == dimensions
    assert stored["model_sha256"] == json.loads((cache / META).read_text())["model_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([TABLE, META])  # no temporary files left
