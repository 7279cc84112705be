"""The evaluator's Prometheus metrics: answers scored, their scores, and each drift signal against
its band. Labels: route, model, outcome, signal, window; never tenant, check name or text."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SCORED = Counter(
    "switchyard_quality_scored_total",
    "Sampled answers the evaluator took, by route, model and outcome: passed, failed (a check failed), "
    "unscored (no check applied or could run), no_suite (the suite was withdrawn).",
    ["route", "model", "outcome"],
)
SCORE = Histogram(
    "switchyard_quality_score", "Quality score (0-1) of the sampled answers, the weighted mean of their suite's checks.",
    ["route", "model"], buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
DRIFT_LABELS = ["route", "model", "signal", "window"]
SIGNAL = Gauge(
    "switchyard_quality_signal",
    "A drift signal (score, latency_ms, escalation, confidence) over the current hourly or daily window.",
    DRIFT_LABELS,
)
BAND_LOW = Gauge("switchyard_quality_band_low", "Low edge of the signal's band around its trailing baseline.",
                 DRIFT_LABELS)
BAND_HIGH = Gauge("switchyard_quality_band_high", "High edge of the signal's band around its trailing baseline.",
                  DRIFT_LABELS)
DRIFTING = Gauge(
    "switchyard_quality_drifting",
    "1 while the signal's current window is outside its band on the harmful side (score or confidence below, "
    "latency or escalation above), else 0.",
    DRIFT_LABELS,
)
DRIFTS = Counter("switchyard_quality_drift_events_total", "Times a signal left its band on the harmful side.",
                 DRIFT_LABELS)
