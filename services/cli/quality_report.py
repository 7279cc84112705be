"""`switchyard quality`: the sampled answers' scores from the books, and each route and model's drift
signals against their trailing baselines, worked out from the books with the evaluator's own rule
(services/evaluator/drift.py).

    switchyard quality                               # by route and model, the last 24 hours
    switchyard quality --by tenant,route --since 7d
    switchyard quality --route chat --json
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from services.cli.cost import DIMENSIONS, filters, parse_by, parse_since
from services.evaluator.drift import DAILY, HOURLY, SIGNALS, Window, assess
from services.sink.store import FINAL_SETTINGS, SCORES_TABLE, CostStore
from shared.settings import masked

def scores(store: CostStore, by: list[str], *, since: datetime, until: datetime | None = None,
           tenant: str | None = None, route: str | None = None) -> list[dict]:
    """One row per group: samples, mean score, pass rate, latency, escalation rate, mean confidence."""
    params: dict = {}
    where = filters(params, since=since, until=until, tenant=tenant, route=route)
    keys = ", ".join(f"{DIMENSIONS[d]} AS {d}" for d in by)
    rows = store.query(
        f"""
        SELECT {keys}, count() AS samples, avg(score) AS mean_score, avg(passed) AS pass_rate,
            quantile(0.95)(latency_ms) AS p95_latency_ms, avg(escalated) AS escalation_rate,
            avg(confidence) AS mean_confidence
        FROM {SCORES_TABLE} FINAL
        WHERE {' AND '.join(where)}
        GROUP BY {', '.join(by)}
        ORDER BY {', '.join(by)}
        """, params, settings=FINAL_SETTINGS)
    for row in rows:
        if isinstance(row.get("hour"), datetime):
            row["hour"] = row["hour"].replace(tzinfo=timezone.utc).isoformat(timespec="minutes")
        for key in ("mean_score", "pass_rate", "p95_latency_ms", "escalation_rate", "mean_confidence"):
            value = row[key]
            row[key] = None if value is None or value != value else round(float(value), 4)
    return rows


def drift(store: CostStore, *, now_s: float, tenant: str | None = None, route: str | None = None,
          windows: tuple[Window, ...] = (HOURLY, DAILY), min_samples: int = 20) -> list[dict]:
    """Every route, model, signal and window: the current window's value, its band, and whether it drifts."""
    out = []
    for window in windows:
        params: dict = {"length": int(window.length_s)}
        since_s = int(now_s // window.length_s - window.baseline_windows) * int(window.length_s)
        where = filters(params, since=datetime.fromtimestamp(since_s, timezone.utc), until=None, tenant=tenant,
                        route=route)
        rows = store.query(
            f"""
            SELECT route, model, intDiv(toUnixTimestamp(ts), {{length:UInt32}}) AS idx, count() AS n,
                sum(score) AS sum_score, sum(latency_ms) AS sum_latency_ms, sum(escalated) AS sum_escalation,
                sum(ifNull(confidence, 0)) AS sum_confidence, countIf(confidence IS NOT NULL) AS n_confidence
            FROM {SCORES_TABLE} FINAL
            WHERE {' AND '.join(where)}
            GROUP BY route, model, idx
            """, params, settings=FINAL_SETTINGS)
        cells: dict[tuple[str, str, str], dict[int, tuple[float, int]]] = {}
        for row in rows:
            for signal in SIGNALS:
                count = row["n_confidence"] if signal == "confidence" else row["n"]
                if count:
                    cells.setdefault((row["route"], row["model"], signal), {})[int(row["idx"])] = (
                        float(row[f"sum_{signal}"]), int(count))
        current = int(now_s // window.length_s)
        for (route_name, model, signal), series in sorted(cells.items()):
            value, count, within, drifting = assess(series, current, window, signal, min_samples=min_samples)
            out.append({"route": route_name, "model": model, "signal": signal, "window": window.name,
                        "value": value, "samples": count, "baseline_windows": within.windows if within else 0,
                        "band_low": within.low if within else None, "band_mean": within.mean if within else None,
                        "band_high": within.high if within else None, "drifting": drifting})
    return out


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return out + ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(score_rows: list[dict], drift_rows: list[dict], by: list[str]) -> str:
    out = _table([*by, "samples", "score", "passed", "p95 ms", "escalated", "confidence"], [
        [str(r[d]) for d in by] + [str(r["samples"]), _num(r["mean_score"]), _num(r["pass_rate"]),
                                   _num(r["p95_latency_ms"], 0), _num(r["escalation_rate"]), _num(r["mean_confidence"])]
        for r in score_rows])
    if not score_rows:
        out.append("(no quality scores in that span)")
    out += ["", "Drift: the current hour against the last 24, today against the last 7 days"]
    lines = []
    for r in drift_rows:
        digits = 0 if r["signal"] == "latency_ms" else 3
        state = ("DRIFTING" if r["drifting"] else "ok" if r["value"] is not None and r["band_low"] is not None
                 else "too few samples" if r["value"] is None else "baseline too short")
        band = "-" if r["band_low"] is None else f"{_num(r['band_low'], digits)} .. {_num(r['band_high'], digits)}"
        lines.append([r["route"], r["model"], r["signal"], r["window"], _num(r["value"], digits), band,
                      str(r["samples"]), state])
    out += _table(["route", "model", "signal", "window", "now", "band", "samples", "state"], lines)
    return "\n".join(out)


def main(settings, *, by: str, since: str, until: str | None, tenant: str | None, route: str | None,
         as_json: bool) -> int:
    dims = parse_by(by)
    start, end = parse_since(since), parse_since(until) if until else None
    store = CostStore.connect(settings.dsn())
    try:
        score_rows = scores(store, dims, since=start, until=end, tenant=tenant, route=route)
        drift_rows = drift(store, now_s=time.time(), tenant=tenant, route=route)
    finally:
        store.close()
    if as_json:
        print(json.dumps({"by": dims, "since": start.isoformat(), "until": end.isoformat() if end else None,
                          "scores": score_rows, "drift": drift_rows}, indent=2, default=str))
    else:
        print(f"Quality of sampled answers from {start.isoformat(timespec='seconds')}"
              + (f" to {end.isoformat(timespec='seconds')}" if end else "") + f" ({masked(settings.dsn())}):")
        print(render(score_rows, drift_rows, dims))
    return 1 if any(r["drifting"] for r in drift_rows) else 0
