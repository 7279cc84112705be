"""Which models the router skips, from the workers' health reports."""

import time

from schemas import InferenceRequest, ModelHealth
from services.router.decide import decide
from services.router.health import HealthBoard
from services.router.policy import parse

POLICIES = parse("""
models:
  small: {tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.6,
          max_p95_latency_ms: 2000, max_error_rate: 0.2, max_backlog: 100}
  large: {tier: large, price_in_usd_per_mtok: 2.5, price_out_usd_per_mtok: 10}
routes:
  chat: {models: [small, large], max_output_tokens: 32}
""")


def report(model="small", worker="w1", age_s=0.0, **fields):
    values = dict(requests=50, errors=0, p95_latency_ms=300, in_flight=3, capacity=64, backlog=0)
    values.update(fields)
    return ModelHealth(model=model, worker=worker, ts_ms=int((time.time() - age_s) * 1000), interval_s=2,
                       window_s=60, **values)


def test_no_reports_or_stale_ones_are_no_evidence():
    board = HealthBoard()
    assert board.unhealthy(POLICIES) == {}
    board.report(report(p95_latency_ms=9000, age_s=30))
    assert board.unhealthy(POLICIES) == {}


def test_each_limit_makes_a_model_unhealthy_with_its_reason():
    for fields, why in [({"p95_latency_ms": 2500}, "p95 latency 2500 ms is over 2000"),
                        ({"errors": 20}, "error rate 40% is over 20%"),
                        ({"in_flight": 64, "backlog": 500}, "overloaded")]:
        board = HealthBoard()
        board.report(report(**fields))
        assert board.unhealthy(POLICIES)["small"].startswith(why)


def test_error_rate_needs_enough_requests_and_counts_every_worker():
    board = HealthBoard()
    board.report(report(requests=4, errors=4))
    assert board.unhealthy(POLICIES) == {}
    board.report(report(worker="w2", requests=20, errors=1))
    assert "error rate" in board.unhealthy(POLICIES)["small"]  # 5 of 24


def test_overloaded_only_when_every_worker_is_full():
    board = HealthBoard()
    board.report(report(in_flight=64, backlog=400))
    board.report(report(worker="w2", in_flight=10, backlog=400))
    assert board.unhealthy(POLICIES) == {}


def test_the_latest_report_of_a_worker_wins():
    board = HealthBoard()
    board.report(report(p95_latency_ms=9000, age_s=1))
    board.report(report(p95_latency_ms=100))
    board.report(report(p95_latency_ms=9000, age_s=2))  # late and older: ignored
    assert board.unhealthy(POLICIES) == {}


def test_an_unhealthy_model_is_skipped_for_the_next_in_the_chain_and_used_when_nothing_else_can():
    request = InferenceRequest(tenant="t", route="chat", reply_to="svc", prompt="hi")
    routed = decide(request, POLICIES, unhealthy={"small": "error rate 40% is over 20%"})
    assert routed.model == "large" and "skipped small: error rate 40% is over 20%" in routed.reasons
    both = decide(request, POLICIES, unhealthy={"small": "slow", "large": "slow"})
    assert both.model == "small" and "every capable model is unhealthy: using them anyway" in both.reasons
