"""`switchyard router train FILE.jsonl`: fit the router's classifier from labeled prompts.

Each line is {"prompt": ...} or {"messages": [...]}, with "label": "simple" or "hard" (or a
tier name). The model learns from every example the rules leave undecided, since those are
the only ones it will ever see; its threshold is set from cross-validated scores to reach the
target recall of hard requests. With --eval, a second labeled file reports how the rules and
the model together do on prompts they were not fitted on.

With --history, the workers' confidence checks on the escalations topic join the labeled
prompts: a request whose answer from a weaker model fell below its route's threshold (and went
on to a stronger one) is an example of hard; one whose answer passed is an example of simple.
A request checked more than once counts by its latest check.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from schemas import ConfidenceCheck, InferenceRequest
from services.router.classify import HARD, SIMPLE, Classifier, features, read_labeled, rules, train
from services.router.decide import estimate_tokens
from services.router.embed import Embedder, asked_text, asked_tokens
from shared import kafka
from shared.codec import decode
from shared.errors import ConfigError, UndecodableMessage
from shared.topics import Topics

BUNDLED = Path(__file__).resolve().parent / "data" / "labeled_train.jsonl"
BUNDLED_EVAL = Path(__file__).resolve().parent / "data" / "labeled_eval.jsonl"


async def history(bootstrap: str, topics: Topics, timeout_s: float = 60.0) -> list[tuple[InferenceRequest, str]]:
    """Labeled examples from every confidence check on the escalations topic, read to its end."""
    reader = kafka.consumer(bootstrap, group_id=None, auto_offset_reset="earliest")
    await reader.start()
    latest: dict[tuple[str, str], ConfidenceCheck] = {}
    try:
        async for record in kafka.from_start(reader, topics.escalations, timeout_s):
            try:
                check = decode(ConfidenceCheck, record.value)
            except UndecodableMessage:
                continue
            key = (check.request.tenant, check.request.id)
            if key not in latest or check.ts_ms >= latest[key].ts_ms:
                latest[key] = check
    finally:
        await reader.stop()
    return [(check.request, HARD if check.escalated else SIMPLE) for check in latest.values()]


def fit_file(path: Path, out: Path, *, target_recall: float = 0.97, eval_path: Path | None = None,
             embedder: Embedder | None = None, extra: list[tuple[InferenceRequest, str]] = ()) -> dict:
    try:
        examples = read_labeled(path) + list(extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    embedder = embedder or Embedder()
    undecided = [(r, label) for r, label in examples
                 if rules(r, asked_text(r), estimate_tokens(r)).label is None]
    labels = np.array([label == HARD for _, label in undecided], dtype=np.int64)
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise ConfigError(f"{path}: the examples the rules leave undecided need both labels "
                          f"(have {int(labels.sum())} hard of {len(labels)})")
    vectors = embedder.embed([asked_text(r) for r, _ in undecided])
    model = train(features(vectors, [asked_tokens(r) for r, _ in undecided]), labels, target_recall=target_recall)
    model.meta["source"] = str(path)
    model.meta["from_history"] = len(extra)
    model.meta["decided_by_rules"] = len(examples) - len(undecided)
    report = {"examples": len(examples), "from_history": len(extra), "decided_by_rules": len(examples) - len(undecided),
              "fitted_on": len(undecided), "threshold": round(model.threshold, 4), **model.meta["cross_validated"]}
    if eval_path is not None:
        report["eval"] = evaluate(Classifier(model, embedder), eval_path)
        model.meta["eval"] = report["eval"]
    model.save(out)
    return report


def evaluate(classifier: Classifier, path: Path) -> dict:
    """How the classifier (rules and model) labels a held-out file."""
    examples = read_labeled(path)
    verdicts = classifier.classify([(r, asked_text(r), asked_tokens(r)) for r, _ in examples])
    truth = np.array([label == HARD for _, label in examples])
    said = np.array([v.label == HARD for v in verdicts])
    by_rules = np.array([v.reason.startswith("rule") for v in verdicts])
    return {
        "examples": len(examples),
        "hard": int(truth.sum()),
        "hard_recall": round(float((said & truth).sum() / max(truth.sum(), 1)), 4),
        "simple_kept_small": round(float((~said & ~truth).sum() / max((~truth).sum(), 1)), 4),
        "accuracy": round(float((said == truth).mean()), 4),
        "decided_by_rules": int(by_rules.sum()),
        "rule_precision": round(float((said & truth & by_rules).sum() / max((said & by_rules).sum(), 1)), 4),
    }


def main(path: Path, out: Path, target_recall: float, eval_path: Path | None, *,
         bootstrap: str | None = None, topics: Topics | None = None) -> int:
    """Fit and save; with `bootstrap`, the escalation history joins the labeled file."""
    extra = asyncio.run(history(bootstrap, topics or Topics())) if bootstrap else []
    report = fit_file(path, out, target_recall=target_recall, eval_path=eval_path, extra=extra)
    print(json.dumps(report, indent=2))
    print(f"classifier written to {out}")
    return 0
