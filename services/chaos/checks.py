"""The promises a drill checks after each scenario: every request answered once, every answer
with its cost records, the books equal to the results, and the stack recovered by itself."""

from __future__ import annotations

from collections import Counter

from schemas import CacheHit, PolicySet, Status
from services.chaos.load import Load
from services.sink.store import CostStore

# Scenarios whose fault is outside the services: none of the services may need a restart for them.
NO_RESTART = {"redis-stop", "provider-faults", "poison-burst"}


def _visible(reply) -> tuple:
    """What a caller reads off an answer; two copies that differ only in timings say the same."""
    r = reply.result
    return r.status, r.output, r.model, r.tokens_in, r.tokens_out, r.error.code if r.error else None


def answers(load: Load, scenario: str) -> dict:
    """The reply side of a scenario: what was sent, answered, lost, and answered more than once."""
    sent = load.of(scenario)
    errors: Counter[str] = Counter()
    ok = lost = duplicates = conflicting = 0
    for s in sent:
        replies = load.replies.get(s.request.id, [])
        if not replies:
            lost += 1
            continue
        first = replies[0].result
        if first.status == Status.ok:
            ok += 1
        else:
            errors[f"{first.status.value}:{first.error.code if first.error else '-'}"] += 1
        duplicates += len(replies) - 1
        conflicting += len({_visible(r) for r in replies}) > 1
    return {"sent": len(sent), "answered": len(sent) - lost, "ok": ok, "errors": dict(errors), "lost": lost,
            "duplicate_replies": duplicates, "conflicting_replies": conflicting}


def _expected(load: Load, request_id: str, policies: PolicySet) -> tuple[int, int]:
    """(cost records, nano-USD) the first answer of a request should have left in the books."""
    result = load.final(request_id).result
    if result.cache_hit != CacheHit.none or result.model is None:
        return 1, 0
    price = policies.models[result.model].price
    # Attempts handed on (a refused or stalled provider call) booked no tokens: only the last one costs.
    return max(1, len(result.escalation_path)), price.cost_nano_usd(result.tokens_in, result.tokens_out)


def books(store: CostStore, load: Load, scenarios: list[str], policies: PolicySet) -> dict[str, dict]:
    """Per scenario: the books (read with FINAL, as every report does) against the answers."""
    rows = store.query(
        "SELECT request_id, count() AS records, sum(cost_nano_usd) AS cost, argMax(tokens_in, attempt) AS tokens_in, "
        "argMax(tokens_out, attempt) AS tokens_out FROM switchyard.cost_records FINAL "
        "WHERE startsWith(request_id, {run:String}) GROUP BY request_id", {"run": f"{load.run}-"})
    raw = {r["request_id"]: r["n"] for r in store.query(
        "SELECT request_id, count() AS n FROM switchyard.cost_records WHERE startsWith(request_id, {run:String}) "
        "GROUP BY request_id", {"run": f"{load.run}-"})}
    booked = {r["request_id"]: r for r in rows}
    out = {}
    for scenario in scenarios:
        double = unbilled = mismatched = 0
        books_cost = results_cost = raw_rows = records = 0
        for s in load.of(scenario):
            rid = s.request.id
            if load.final(rid) is None:
                continue
            want_records, want_cost = _expected(load, rid, policies)
            got = booked.get(rid)
            results_cost += want_cost
            if got is None:
                unbilled += 1
                continue
            raw_rows += raw.get(rid, 0)
            records += got["records"]
            books_cost += got["cost"]
            first = load.final(rid).result
            double += got["records"] > want_records or got["cost"] > want_cost
            unbilled += got["records"] < want_records
            mismatched += (got["tokens_in"], got["tokens_out"]) != (first.tokens_in, first.tokens_out) \
                and first.cache_hit == CacheHit.none and first.model is not None
        out[scenario] = {"double_billed": double, "unbilled": unbilled, "billed_unlike_answer": mismatched,
                         "book_records": records, "book_rows_before_dedupe": raw_rows,
                         "books_nano_usd": books_cost, "results_nano_usd": results_cost,
                         "books_equal_results": books_cost == results_cost}
    return out


def problems(row: dict) -> list[str]:
    """What broke a promise in this scenario's row; empty when it held."""
    out = []
    if row["sent"] == 0:
        out.append("no request was sent")
    for key in ("lost", "conflicting_replies", "double_billed", "unbilled", "billed_unlike_answer"):
        if row.get(key):
            out.append(f"{key}: {row[key]}")
    if not row.get("books_equal_results", True):
        out.append(f"books {row['books_nano_usd']} nano-USD != results {row['results_nano_usd']}")
    if row["recovery_s"] is None:
        out.append("did not recover within the timeout")
    if row["scenario"] in NO_RESTART and any(row["restarts"].values()):
        out.append(f"services restarted: {row['restarts']}")
    seen = row["seen"]
    if row["scenario"] == "redis-stop" and not seen.get("degraded_parts_seen"):
        out.append("no metric said Redis was away (switchyard_redis_degraded stayed 0)")
    if row["scenario"] == "poison-burst":
        if seen.get("dead_letters") != seen.get("poison_sent"):
            out.append(f"{seen.get('poison_sent')} poison messages, {seen.get('dead_letters')} dead letters")
        if seen.get("error_replies") != len(seen.get("addressed", [])):
            out.append(f"{seen.get('error_replies')} error replies to {len(seen.get('addressed', []))} addressed senders")
    if row["scenario"] == "provider-faults" and not row["seen"].get("moved_on"):
        out.append("no request moved on from the failing provider")
    return out
