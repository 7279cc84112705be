"""How hard is a request? Fast rules for the obvious cases, a learned classifier for the rest.

The rules look at what a request carries (tools, a large response schema, code, mathematics,
multi-step reasoning cues, length) and answer in microseconds. What they leave undecided goes
to a logistic regression over the request's MiniLM embedding, fitted by `switchyard router
train` from labeled prompts. Its threshold is chosen in training for a target recall of hard
requests, because sending a hard request to the small model costs quality while sending an
easy one to the large model only costs money.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas import InferenceRequest

SIMPLE, HARD = "simple", "hard"
LABELS = (SIMPLE, HARD)
FORMAT_VERSION = 2  # 2: features are the embedding and the input length

LONG_INPUT_TOKENS = 600
LARGE_SCHEMA_FIELDS = 12

# Linear in the text (the rules read every request's last turn): nothing that can match the same
# characters two ways is quantified twice. Possessive quantifiers (*+, ++) give nothing back, a
# pattern starts only at a word's first letter (\b), and a line's indent never runs on into the
# next line. For search() each finds what the plain form found (a stack frame's method name may no
# longer hold a parenthesis); tests/unit/test_classify.py times them on a megabyte of adversarial text.
_CODE = re.compile(
    r"```|Traceback \(most recent call last\)|^[^\S\n]*+(def|class|import|from \S++ import|#include|public static|"
    r"func|fn|SELECT .+ FROM|CREATE TABLE)\b|\b\w++\([^()\n]*+\)\s*+\{|=>|;[^\S\n]*+$|"
    r"\bat [^\s(]++\([^\s()]+\.(java|kt|js|ts):\d+\)",
    re.MULTILINE,
)
_MATH = re.compile(
    r"\\(frac|int|sum|sqrt|lim|prod)\b|\$[^$\n\\^_=]*+[\\^_=][^$\n]*+\$|\b(prove|proof|derivative|integral|"
    r"integrate|differentiate|eigen\w*|theorem|lemma|induction|solve for|probability that|expected value|variance of)\b|"
    r"\b[a-z]\s*+\^\s*+\d|\b\d++\s*+[a-z]\s*+[+\-]\s*+\d++\s*+=",
    re.IGNORECASE,
)
_REASONING = re.compile(
    r"\b(step[- ]by[- ]step|think (it )?through|trade-?offs?|pros and cons|compare and contrast|"
    r"root cause|design (a|an|the) \w+ (system|architecture|service|schema|pipeline)|"
    r"justify (your|the) (answer|choice)|what would happen if|under what conditions)\b",
    re.IGNORECASE,
)
_GREETING = re.compile(r"^\W*(hi|hello|hey|thanks|thank you|good (morning|afternoon|evening)|bye)\b[\w\s,!.?']{0,30}$",
                       re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    label: str | None  # None: the rules could not tell
    reason: str


def estimate(request: InferenceRequest) -> int:
    from services.router.decide import estimate_tokens

    return estimate_tokens(request)


def rules(request: InferenceRequest, text: str, tokens_in: int) -> Verdict:
    """The fast path: a label with its reason, or no label. `tokens_in`: the whole input's estimate."""
    if request.tools:
        return Verdict(HARD, f"rule: {len(request.tools)} tool(s) offered")
    if request.response_schema and _schema_fields(request.response_schema) > LARGE_SCHEMA_FIELDS:
        return Verdict(HARD, f"rule: response schema with more than {LARGE_SCHEMA_FIELDS} fields")
    if tokens_in > LONG_INPUT_TOKENS:
        return Verdict(HARD, f"rule: long input (about {tokens_in} tokens)")
    last = text if request.messages is None else request.messages[-1].content
    if _CODE.search(last):
        return Verdict(HARD, "rule: code")
    if _MATH.search(last):
        return Verdict(HARD, "rule: mathematics")
    if _REASONING.search(last):
        return Verdict(HARD, "rule: multi-step reasoning cue")
    if _GREETING.match(last):
        return Verdict(SIMPLE, "rule: greeting")
    return Verdict(None, "rules undecided")


def _schema_fields(schema, depth: int = 0) -> int:
    if depth > 8 or not isinstance(schema, dict):
        return 0
    count = 0
    for key in ("properties", "$defs", "definitions"):
        props = schema.get(key)
        if isinstance(props, dict):
            count += len(props) + sum(_schema_fields(p, depth + 1) for p in props.values())
    if isinstance(schema.get("items"), dict):
        count += _schema_fields(schema["items"], depth + 1)
    return count


def features(embeddings: np.ndarray, tokens_in) -> np.ndarray:
    """The embedding and the input's length: longer requests are more often hard, and the
    embedding, being unit length, does not carry it."""
    length = (np.log1p(np.asarray(tokens_in, dtype=np.float32)) - 3.0) / 2.0
    return np.hstack([embeddings, length[:, None]]).astype(np.float32)


@dataclass
class Model:
    """Logistic regression over features(): P(hard) = sigmoid(w·x + b)."""

    weights: np.ndarray
    bias: float
    threshold: float
    meta: dict

    def p_hard(self, embeddings: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(embeddings @ self.weights + self.bias)))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({
            "format": FORMAT_VERSION, "embedder": "all-MiniLM-L6-v2", "labels": list(LABELS),
            "weights": [round(float(w), 7) for w in self.weights], "bias": self.bias,
            "threshold": self.threshold, "meta": self.meta,
        }, indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Model:
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: classifier format {raw.get('format')!r}, expected {FORMAT_VERSION}")
        return cls(np.asarray(raw["weights"], dtype=np.float32), float(raw["bias"]), float(raw["threshold"]),
                   raw.get("meta", {}))


def fit(embeddings: np.ndarray, hard: np.ndarray, *, l2: float = 1e-3, epochs: int = 400,
        learning_rate: float = 2.0) -> tuple[np.ndarray, float]:
    """Class-balanced, L2-regularised logistic regression by full-batch gradient descent."""
    x = embeddings.astype(np.float64)
    y = hard.astype(np.float64)
    positives = max(y.sum(), 1.0)
    negatives = max(len(y) - y.sum(), 1.0)
    sample_weight = np.where(y == 1, len(y) / (2 * positives), len(y) / (2 * negatives))
    w = np.zeros(x.shape[1])
    b = 0.0
    for _ in range(epochs):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        g = sample_weight * (p - y) / len(y)
        w -= learning_rate * (x.T @ g + l2 * w)
        b -= learning_rate * g.sum()
    return w.astype(np.float32), float(b)


def pick_threshold(p_hard: np.ndarray, hard: np.ndarray, target_recall: float) -> float:
    """The highest threshold that still labels `target_recall` of the hard examples hard."""
    scores = np.sort(p_hard[hard == 1])
    if len(scores) == 0:
        return 0.5
    allowed_misses = int(np.floor((1.0 - target_recall) * len(scores)))
    return float(scores[allowed_misses]) - 1e-6


def train(embeddings: np.ndarray, hard: np.ndarray, *, target_recall: float = 0.97, folds: int = 5,
          seed: int = 7) -> Model:
    """Fit on everything; choose the threshold from out-of-fold scores so it is not tuned on seen data."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(hard))
    out_of_fold = np.zeros(len(hard))
    for k in range(folds):
        held = order[k::folds]
        kept = np.setdiff1d(order, held)
        w, b = fit(embeddings[kept], hard[kept])
        out_of_fold[held] = 1.0 / (1.0 + np.exp(-(embeddings[held] @ w + b)))
    threshold = pick_threshold(out_of_fold, hard, target_recall)
    w, b = fit(embeddings, hard)
    predicted = out_of_fold >= threshold
    meta = {
        "examples": int(len(hard)), "hard": int(hard.sum()), "target_recall": target_recall,
        "cross_validated": {
            "hard_recall": _ratio((predicted & (hard == 1)).sum(), (hard == 1).sum()),
            "simple_kept_small": _ratio((~predicted & (hard == 0)).sum(), (hard == 0).sum()),
        },
    }
    return Model(w, b, threshold, meta)


def _ratio(a, b) -> float:
    return round(float(a) / float(b), 4) if b else 0.0


def read_labeled(path: Path) -> list[tuple[InferenceRequest, str]]:
    """Labeled examples, one JSON object a line: {"prompt"|"messages": ..., "label": "simple"|"hard"}.
    A label may also be a tier name: the policy's cheapest tier counts as simple, any other as hard."""
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            label = raw["label"]
            body = {"messages": raw["messages"]} if "messages" in raw else {"prompt": raw["prompt"]}
            request = InferenceRequest(id=f"train-{number}", tenant="train", route="train", reply_to="train", **body)
        except Exception as exc:  # noqa: BLE001 - any bad line is reported with its number
            raise ValueError(f"{path}:{number}: not a labeled example ({exc})") from None
        if label not in LABELS and label not in ("small", "large", "frontier"):
            raise ValueError(f"{path}:{number}: label {label!r} is not one of simple, hard, small, large, frontier")
        examples.append((request, HARD if label in (HARD, "large", "frontier") else SIMPLE))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


class Classifier:
    """Rules first; the learned model for the rest; without one, the rest count as simple."""

    def __init__(self, model: Model | None, embedder=None):
        if model is not None and embedder is None:
            raise ValueError("a learned classifier needs an embedder")
        self.model = model
        self.embedder = embedder

    def classify(self, items: list[tuple[InferenceRequest, str, int]],
                 embeddings: np.ndarray | None = None) -> list[Verdict]:
        """Verdicts for (request, asked text, its estimated tokens) (see embed.asked_text);
        `embeddings`, when given, are the asked texts' embeddings in the same order."""
        verdicts = [rules(request, text, estimate(request)) for request, text, _ in items]
        if self.model is None:
            return [v if v.label else Verdict(SIMPLE, "no classifier: the route's cheapest tier") for v in verdicts]
        undecided = [i for i, v in enumerate(verdicts) if v.label is None]
        if undecided:
            if embeddings is None:
                vectors = self.embedder.embed([items[i][1] for i in undecided])
            else:
                vectors = embeddings[undecided]
            tokens = [items[i][2] for i in undecided]
            for i, p in zip(undecided, self.model.p_hard(features(vectors, tokens))):
                label = HARD if p >= self.model.threshold else SIMPLE
                verdicts[i] = Verdict(label, f"classifier: p(hard)={p:.2f} (threshold {self.model.threshold:.2f})")
        return verdicts
