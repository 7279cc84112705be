"""The semantic cache's guard signature: kept by paraphrases, changed by what changes the answer, fast on any input."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.semantic_guard import MOST, features, signature

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("a, b", [
    ("What is 15% of 80?", "Calculate fifteen percent of 80."),
    ("Can I get a refund if I cancel within 30 days?", "If I cancel in the first 30 days, am I refunded?"),
    ("What's the difference between a list and a tuple in Python?", "In Python, how do tuples differ from lists?"),
    ("Explain what a REST API is in simple terms.", "Can you give me a simple explanation of REST APIs?"),
    ("Convert 1,000 USD to EUR.", "How much is 1000 USD in EUR?"),
    ("Why doesn't my code compile?", "Why does my code not compile?"),
    ("What is the capital of Australia?", "Which city is Australia's capital?"),
    ("How do I make an HTTP request in Go?", "Go: how can I send an HTTP request in Go?"),
    ("What's the mean of 4, 8, 15, 16, 23 and 42?", "Compute the average of 4,8,15,16,23,42."),
    ("Give me twenty-five tips.", "List 25 tips."),
    ("user: I'm on the Basic plan.\nassistant: Thanks, how can I help?\nuser: How do I export my data?",
     "user: I'm on the Basic plan.\nassistant: Thanks, how can I help?\nuser: What's the way to export all my data?"),
])
def test_paraphrases_that_keep_numbers_negations_and_names_share_a_signature(a, b):
    assert signature(a) == signature(b), (features(a), features(b))


@pytest.mark.parametrize("a, b", [
    # numbers
    ("What is 15% of 80?", "What is 15% of 60?"),
    ("What is 15% of 80?", "What is 15 of 80?"),
    ("Round 3.14159 to two decimal places.", "Round 3.14159 to three decimal places."),
    ("Calculate the payment on a $200,000 mortgage.", "Calculate the payment on a $20,000 mortgage."),
    ("Subtract 7 from 20.", "Subtract 20 from 7."),
    ("What's the derivative of x^3?", "What's the derivative of x^4?"),
    # negation
    ("Which fruits are safe for dogs to eat?", "Which fruits are not safe for dogs to eat?"),
    ("Why does my code work?", "Why doesn't my code work?"),
    ("Write a SQL query for customers who have placed an order.",
     "Write a SQL query for customers who have never placed an order."),
    ("Summarize the arguments for nuclear power.", "Summarize the arguments against nuclear power."),
    # identifiers, in order
    ("Convert 100 USD to EUR.", "Convert 100 EUR to USD."),
    ("Write a function that converts JSON to YAML.", "Write a function that converts YAML to JSON."),
    ("How do I reverse a list in Python?", "How do I reverse a list in Rust?"),
    ("Write a hello world program in C.", "Write a hello world program in C++."),
    ("How do I sort an array in C#?", "How do I sort an array in Kotlin?"),
    ("What is the capital of France?", "What is the capital of Spain?"),
    ("Move the meeting from Monday to Friday.", "Move the meeting from Friday to Monday."),
    ("How do I export my contacts from an iPhone?", "How do I export my contacts from an Android phone?"),
    ("Rename every .txt file to .md.", "Rename every .md file to .txt."),
    ("What does os.path.join do?", "What does os.path.split do?"),
    # directions
    ("Transfer $500 from my savings account to my checking account.",
     "Transfer $500 from my checking account to my savings account."),
])
def test_a_changed_number_negation_name_or_direction_changes_the_signature(a, b):
    assert signature(a) != signature(b), features(a)


def test_features_read_as_documented():
    f = features("Convert 1,000.50 USD to EUR, then take fifteen percent of twenty-five APIs in Python and C#; "
                 "don't use os.path or max_tokens() from the laptop to the server.")
    assert f["numbers"] == ["1000.50", "15%", "25"]
    assert f["negations"] == 1
    assert f["identifiers"] == ["usd", "eur", "api", "python", "c#", "os.path", "max_tokens", "max_tokens()"]
    assert f["directions"] == ["laptop>server"]
    # Opening a sentence, a capitalized word is not a name; "Go" and "C" only count as languages inside one.
    assert features("Go to the settings page. Where is it?")["identifiers"] == []
    assert features("Is it written in Go or in C?")["identifiers"] == ["go", "c"]
    assert features("It is 30 °C outside")["identifiers"] == []
    # A language named with a symbol, in a text with no other "c" (it used to need one).
    assert features("Write it in F#, then port it.")["identifiers"] == ["f#"]
    # Shouting: when most words are capitals, capitals are not identifiers.
    assert signature("HOW DO I RESET MY PASSWORD") == signature("how do i reset my password")


def test_signature_is_16_hex_and_deterministic_across_calls_and_processes():
    texts = ["", "   ", "How do I reset my password?", "Convert 100 USD to EUR.", "naïve café: ÉCOLE! ٣ 😀"]
    first = [signature(t) for t in texts]
    assert all(re.fullmatch(r"[0-9a-f]{16}", s) for s in first)
    assert [signature(t) for t in texts] == first
    assert signature("") == signature("   ") == signature("Hello there.")  # nothing to compare: all agree
    code = ("import json, sys; from shared.semantic_guard import signature; "
            "print(json.dumps([signature(t) for t in json.load(sys.stdin)]))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        assert json.loads(out) == first


def test_a_text_with_too_many_matches_is_compared_whole():
    many = " ".join(str(i) for i in range(MOST + 1))
    assert features(many) is None
    assert signature(many) == signature(many)
    assert signature(many) != signature(many + " x")
    assert signature(many) != signature(" ".join(str(i) for i in range(MOST + 2)))


ADVERSARIAL = {
    "number list": "1," * 500_000,
    "one word": "a" * 10**6,
    "digits": "9" * 10**6,
    "spaces": " " * 10**6,
    "underscores": "a" + "_" * 10**6,
    "underscored": "a_" * 500_000,
    "dotted": "a." * 500_000,
    "calls": "a(" * 500_000,
    "capitals": "A." * 500_000,
    "names": "Go " * 333_333,
    "possessives": "Aa'" * 333_333,
    "from": "from " * 200_000,
    "from and spaces": "from" + " " * 10**6 + "x",
    "contractions": "n't " * 250_000,
    "number words": "twenty-" * 140_000,
    "mixed": ("1,000.5% from the x to y Python os.path foo( a_b C++ don't USD iPhone " * 20_000)[:10**6],
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_a_megabyte_of_adversarial_text_takes_well_under_two_seconds(name):
    text = ADVERSARIAL[name]
    started = time.perf_counter()
    signature(text)
    assert time.perf_counter() - started < 2.0

