"""The drift band: a signal against its own trailing baseline, flagged only on the harmful side, with a
floor under the band's width; and the tracker's windows (empty windows left out, old ones dropped)."""

from __future__ import annotations

import pytest

from schemas.quality import ScoreRecord
from services.evaluator.drift import Tracker, Window, band, harmful

WINDOW = Window("hourly", 10.0, 5)


def record(at_s: float, score: float, *, latency_ms: int = 500, escalated: bool = False,
           confidence: float | None = 0.8, route: str = "chat", model: str = "small") -> ScoreRecord:
    return ScoreRecord(request_id=f"r{at_s}-{score}", created_at_ms=int(at_s * 1000), ts_ms=int(at_s * 1000),
                       tenant="acme", route=route, model=model, suite_version="1", score=score, passed=score > 0.5,
                       latency_ms=latency_ms, escalated=escalated, confidence=confidence)


def state(tracker: Tracker, now_s: float, signal: str, route: str = "chat"):
    return next(s for s in tracker.states(now_s) if s.signal == signal and s.route == route)


def test_the_band_is_the_mean_plus_or_minus_three_deviations():
    b = band([0.8, 0.9, 0.7, 0.8], "score")
    assert b.mean == pytest.approx(0.8) and b.windows == 4
    std = (0.02 / 4) ** 0.5
    assert b.low == pytest.approx(0.8 - 3 * std) and b.high == pytest.approx(0.8 + 3 * std)


def test_a_steady_baseline_gets_a_floor_under_its_width():
    b = band([0.9, 0.9, 0.9], "score")
    assert (b.low, b.high) == pytest.approx((0.85, 0.95))
    latency = band([1000.0, 1000.0, 1000.0], "latency_ms")
    assert (latency.low, latency.high) == pytest.approx((750.0, 1250.0))  # a quarter of the mean


def test_too_short_a_baseline_gives_no_band():
    assert band([0.9, 0.9], "score") is None
    assert band([0.9, 0.9], "score", min_windows=2) is not None


@pytest.mark.parametrize("signal, value, bad", [
    ("score", 0.5, True), ("score", 1.0, False),  # better quality is not drift
    ("confidence", 0.5, True), ("confidence", 1.0, False),
    ("latency_ms", 1500.0, True), ("latency_ms", 100.0, False),  # faster is not drift
    ("escalation", 0.9, True), ("escalation", 0.0, False),
])
def test_only_the_harmful_side_counts(signal, value, bad):
    baseline = {"score": [0.8] * 4, "confidence": [0.8] * 4, "latency_ms": [800.0] * 4, "escalation": [0.3] * 4}
    assert harmful(value, band(baseline[signal], signal), signal) is bad


def fill(tracker: Tracker, windows: range, score: float, per_window: int = 5, **fields) -> None:
    for w in windows:
        for i in range(per_window):
            tracker.observe(record(w * WINDOW.length_s + i, score, **fields))


def test_scores_that_drop_in_the_current_window_drift_and_recover_when_they_return():
    tracker = Tracker((WINDOW,), min_samples=5, min_windows=3)
    fill(tracker, range(0, 4), 0.9)
    steady = state(tracker, 45.0, "score")
    assert steady.value is None and steady.band.windows == 4 and not steady.drifting  # the current window is empty
    fill(tracker, range(4, 5), 0.4)
    dropped = state(tracker, 45.0, "score")
    assert dropped.value == pytest.approx(0.4) and dropped.samples == 5 and dropped.drifting
    assert not state(tracker, 45.0, "latency_ms").drifting
    fill(tracker, range(5, 6), 0.9)  # the bad window is now part of the baseline, which widens the band
    assert not state(tracker, 55.0, "score").drifting


def test_a_window_with_too_few_samples_neither_judges_nor_joins_the_baseline():
    tracker = Tracker((WINDOW,), min_samples=5, min_windows=3)
    fill(tracker, range(0, 3), 0.9)
    fill(tracker, range(3, 4), 0.1, per_window=2)  # too few to say anything
    assert state(tracker, 35.0, "score").value is None
    assert state(tracker, 45.0, "score").band.windows == 3


def test_latency_escalation_and_confidence_drift_on_their_own():
    tracker = Tracker((WINDOW,), min_samples=5, min_windows=3)
    fill(tracker, range(0, 4), 0.9, latency_ms=500, confidence=0.8)
    fill(tracker, range(4, 5), 0.9, latency_ms=2000, escalated=True, confidence=0.3)
    states = {s.signal: s.drifting for s in tracker.states(45.0)}
    assert states == {"score": False, "latency_ms": True, "escalation": True, "confidence": True}


def test_routes_and_models_have_their_own_baselines_and_old_windows_are_dropped():
    tracker = Tracker((WINDOW,), min_samples=5, min_windows=3)
    fill(tracker, range(0, 4), 0.9)
    fill(tracker, range(0, 4), 0.3, route="faq")
    fill(tracker, range(4, 5), 0.3, route="faq")  # low, but low is what faq always scores
    assert not state(tracker, 45.0, "score", route="faq").drifting
    assert state(tracker, 200.0, "score").band is None  # its windows are past the 5-window baseline
