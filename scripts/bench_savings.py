"""Savings benchmark: what the router's choices cost against sending every request to the large tier.

Workload: the held-out labeled prompts in services/router/data/labeled_eval.jsonl (about 70%
simple, 30% hard; written for Switchyard, see that folder's README), routed on a two-tier
route with the real decision path: the fast rules, the classifier fitted on labeled_train.jsonl
(never on these prompts), and decide(). Prices are deploy/policy.yaml's (small $0.15/$0.60,
large $2.50/$10 per 1M tokens). Input tokens are the router's estimate; output tokens are an
assumption, because which model answers does not change what a good answer needs:
  uniform  every request gets the same output budget (the route's max_output_tokens), so the
           saving comes from routing alone;
  skewed   hard requests write five times longer answers than simple ones (500 vs 100
           tokens), which makes the hard 30% a bigger share of the bill.
Prints a table and writes JSON (bench-results/savings.json by default).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.router import train  # noqa: E402
from services.router.classify import HARD, Classifier, Model, read_labeled  # noqa: E402
from services.router.decide import decide, estimate_tokens  # noqa: E402
from services.router.embed import Embedder, asked_text, asked_tokens  # noqa: E402
from services.router.policy import load  # noqa: E402

TARGET_SAVING = 0.60
TARGET_HARD_TO_LARGE = 0.95
OUTPUT_TOKENS = {"uniform": {"simple": 512, "hard": 512}, "skewed": {"simple": 100, "hard": 500}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "savings.json")
    parser.add_argument("--target-recall", type=float, default=0.97)
    args = parser.parse_args()

    policies = load(ROOT / "deploy" / "policy.yaml")
    route = "chat"
    embedder = Embedder()
    model_path = ROOT / "bench-results" / "classifier.json"
    fit = train.fit_file(train.BUNDLED, model_path, target_recall=args.target_recall, embedder=embedder)
    classifier = Classifier(Model.load(model_path), embedder)

    examples = read_labeled(train.BUNDLED_EVAL)
    requests = [r.model_copy(update={"route": route}) for r, _ in examples]
    labels = [label for _, label in examples]
    started = time.perf_counter()
    tokens = [estimate_tokens(r) for r in requests]
    verdicts = classifier.classify([(r, asked_text(r), asked_tokens(r)) for r in requests])
    routed = [decide(r, policies, tokens_in=t, hard=v.label == HARD, reasons=[v.reason])
              for r, t, v in zip(requests, tokens, verdicts)]
    judge_ms = (time.perf_counter() - started) * 1000 / len(requests)

    large = policies.models["large"].price
    hard = [i for i, label in enumerate(labels) if label == HARD]
    simple = [i for i, label in enumerate(labels) if label != HARD]
    hard_to_large = sum(1 for i in hard if routed[i].model == "large") / len(hard)
    simple_to_small = sum(1 for i in simple if routed[i].model == "small") / len(simple)
    rows = []
    for name, out_tokens in OUTPUT_TOKENS.items():
        cost = all_large = 0
        for i, r in enumerate(routed):
            out = out_tokens[labels[i]]
            cost += r.price.cost_nano_usd(tokens[i], out)
            all_large += large.cost_nano_usd(tokens[i], out)
        saving = 1 - cost / all_large
        rows.append({
            "output_tokens": name, "requests": len(requests), "hard_share": round(len(hard) / len(requests), 3),
            "cost_per_request_usd": cost / len(requests) / 1e9, "all_large_per_request_usd": all_large / len(requests) / 1e9,
            "saving": round(saving, 4), "hard_to_large": round(hard_to_large, 4),
            "simple_to_small": round(simple_to_small, 4),
            "met": saving >= TARGET_SAVING and hard_to_large >= TARGET_HARD_TO_LARGE,
        })

    by_rules = sum(1 for v in verdicts if v.reason.startswith("rule"))
    print(f"Savings on {len(requests)} held-out labeled prompts ({len(hard)} hard, {len(simple)} simple), "
          f"route {route!r} of deploy/policy.yaml; classifier threshold {fit['threshold']:.3f} "
          f"(fitted on {fit['fitted_on']} of {fit['examples']} training prompts, target recall {args.target_recall})")
    header = f"{'output tokens':<14} {'$/request':>11} {'all large':>11} {'saving':>7} {'hard→large':>10} " \
             f"{'simple→small':>12}  target (≥60%, ≥95%)"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['output_tokens']:<14} {row['cost_per_request_usd']:>11.7f} {row['all_large_per_request_usd']:>11.7f} "
              f"{row['saving']:>7.1%} {row['hard_to_large']:>10.1%} {row['simple_to_small']:>12.1%}  "
              f"{'met' if row['met'] else 'NOT met'}")
    print(f"decided by rules: {by_rules}; by the classifier: {len(requests) - by_rules}; "
          f"judging took {judge_ms:.2f} ms a request (embedding included, batched) on {platform.processor() or platform.machine()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "workload": str(train.BUNDLED_EVAL.relative_to(ROOT)), "trained_on": str(train.BUNDLED.relative_to(ROOT)),
        "prices": {m: {"in": str(s.price_in_usd_per_mtok), "out": str(s.price_out_usd_per_mtok)}
                   for m, s in policies.models.items()},
        "output_tokens": OUTPUT_TOKENS, "fit": fit, "rows": rows, "decided_by_rules": by_rules,
        "judge_ms_per_request": judge_ms,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(row["met"] for row in rows[:1]) else 1


if __name__ == "__main__":
    sys.exit(main())
