"""The status page `switchyard up` serves: live throughput, latency, cache hit rate, cost by tenant.

It reads what Prometheus would: every child's /metrics, every couple of seconds. Rates and
latency quantiles come from the difference between the newest scrape and one about `window_s`
older, so they say what is happening now; costs and tokens are totals since the stack started.
The page itself is one HTML file with no outside assets that asks /api/status for its figures.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Prometheus text format -> {(sample name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def total(samples: Samples, name: str, by: str | None = None, **match: str) -> dict[str, float] | float:
    """Sum of the samples called `name` whose labels include `match`; grouped by label `by` if given."""
    grouped: dict[str, float] = defaultdict(float)
    whole = 0.0
    for (sample, labels), value in samples.items():
        if sample != name:
            continue
        labels = dict(labels)
        if any(labels.get(k) != v for k, v in match.items()):
            continue
        whole += value
        if by is not None:
            grouped[labels.get(by, "")] += value
    return dict(grouped) if by is not None else whole


def increase(new: float, old: float) -> float:
    """A counter's increase; a counter that went down was reset (its process restarted)."""
    return new - old if new >= old else new


def buckets(samples: Samples, name: str, **match: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound, summed over its other labels."""
    out: dict[float, float] = defaultdict(float)
    for (sample, labels), value in samples.items():
        if sample != f"{name}_bucket":
            continue
        labels = dict(labels)
        if any(labels.get(k) != v for k, v in match.items()):
            continue
        out[float(labels["le"])] += value
    return dict(out)


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """The q-quantile of a histogram from its cumulative buckets, interpolating linearly inside
    the bucket it falls in (as Prometheus's histogram_quantile does); None without observations."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bound: the best that can be said
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower


class StatusPage:
    """Scrapes `targets` ({service: metrics URL}) and serves the page on 127.0.0.1:`port`."""

    def __init__(self, targets: dict[str, str], port: int, *, host: str = "127.0.0.1", interval_s: float = 2.0,
                 window_s: float = 30.0):
        self.targets = targets
        self.interval_s = interval_s
        self.window_s = window_s
        self._history: deque[tuple[float, Samples, dict[str, bool]]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE.encode())
                elif self.path == "/api/status":
                    self._send(200, "application/json", json.dumps(page.snapshot()).encode())
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/"
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True),
                         threading.Thread(target=self._scrape_forever, daemon=True)]

    def start(self) -> str:
        for thread in self._threads:
            thread.start()
        return self.url

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _scrape_forever(self) -> None:
        with httpx.Client(timeout=1.5) as http:
            while not self._stop.is_set():
                self.scrape(http)
                self._stop.wait(self.interval_s)

    def scrape(self, http: httpx.Client) -> None:
        merged: Samples = {}
        up: dict[str, bool] = {}
        for name, url in self.targets.items():
            try:
                response = http.get(url)
                response.raise_for_status()
                for key, value in parse(response.text).items():
                    merged[key] = merged.get(key, 0.0) + value
                up[name] = True
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("could not scrape %s at %s: %r", name, url, exc)
                up[name] = False
        now = time.monotonic()
        with self._lock:
            self._history.append((now, merged, up))
            # Keep one scrape older than the window, to measure the window against.
            while len(self._history) > 2 and self._history[1][0] <= now - self.window_s:
                self._history.popleft()

    def snapshot(self) -> dict:
        with self._lock:
            history = list(self._history)
        if not history:
            return {"ready": False, "services": {name: False for name in self.targets}}
        t_new, new, up = history[-1]
        t_old, old, _ = history[0]
        span = t_new - t_old
        return {"ready": True, "window_s": round(span, 1), "services": up, **figures(new, old, span)}


def figures(new: Samples, old: Samples, span_s: float) -> dict:
    """The page's figures from two scrapes `span_s` apart (old may be empty: then only totals)."""

    def rate(name: str, **match) -> float | None:
        if span_s <= 0:
            return None
        return increase(total(new, name, **match), total(old, name, **match)) / span_s

    whole, before = buckets(new, "switchyard_request_seconds"), buckets(old, "switchyard_request_seconds")
    window = {le: increase(count, before.get(le, 0.0)) for le, count in whole.items()}
    recent = bool(window) and max(window.values()) > 0
    latency_source = window if recent else whole

    def ms(q: float) -> float | None:
        value = quantile(q, latency_source)
        return None if value is None else round(value * 1000, 1)

    lookups = {}
    for kind in ("exact", "semantic", "idempotency"):
        hits = total(new, "switchyard_router_cache_total", kind=kind, result="hit")
        misses = total(new, "switchyard_router_cache_total", kind=kind, result="miss")
        lookups[kind] = {"hits": int(hits), "lookups": int(hits + misses),
                         "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None}
    booked = total(new, "switchyard_booked_requests_total", by="cache_hit")
    booked_all = sum(booked.values())
    from_memory = booked_all - booked.get("none", 0.0)

    cost = total(new, "switchyard_booked_cost_usd_total", by="tenant")
    tokens_in = total(new, "switchyard_booked_tokens_total", by="tenant", direction="in")
    tokens_out = total(new, "switchyard_booked_tokens_total", by="tenant", direction="out")
    tenants = sorted(set(cost) | set(tokens_in) | set(tokens_out), key=lambda t: (-cost.get(t, 0.0), t))

    models = {}
    in_flight = total(new, "switchyard_worker_in_flight", by="model")
    capacity = total(new, "switchyard_worker_capacity", by="model")
    lag = total(new, "switchyard_consumer_lag_records", by="group")
    for model in sorted(set(in_flight) | set(capacity)):
        models[model] = {"in_flight": int(in_flight.get(model, 0)), "capacity": int(capacity.get(model, 0)),
                         "lag": int(lag.get(f"worker.{model}", 0)),
                         "tokens_per_s": _round(rate("switchyard_worker_tokens_total", model=model, kind="completion"))}
    return {
        "throughput": {
            "requests_per_s": _round(rate("switchyard_router_requests_total")),
            "answered_per_s": _round(rate("switchyard_booked_requests_total")),
            "tokens_per_s": _round(rate("switchyard_worker_tokens_total", kind="completion")),
        },
        "latency_ms": {"p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99),
                       "basis": "window" if recent else "since start"},
        "cache": {"answered_from_memory": int(from_memory), "answered": int(booked_all),
                  "hit_rate": round(from_memory / booked_all, 4) if booked_all else None, "lookups": lookups},
        "cost_by_tenant": [{"tenant": t, "usd": round(cost.get(t, 0.0), 9), "tokens_in": int(tokens_in.get(t, 0)),
                            "tokens_out": int(tokens_out.get(t, 0))} for t in tenants],
        "cost_usd": round(sum(cost.values()), 9),
        "models": models,
        "router_lag": int(sum(v for g, v in lag.items() if g.startswith("router."))),
        "sink_lag": int(lag.get("sink", 0)),
        "dead_letters": int(total(new, "switchyard_dead_letters_total")),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Switchyard status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}
 h1{font-size:20px;margin:0 0 4px} .sub{color:#667;margin-bottom:18px}
 .tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;margin-bottom:20px}
 .tile{background:#fff;border:1px solid #dde;border-radius:8px;padding:12px}
 .tile .label{color:#667;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
 .tile .value{font-size:24px;font-weight:600;margin-top:4px}
 table{border-collapse:collapse;background:#fff;border:1px solid #dde;margin-bottom:20px;min-width:420px}
 th,td{padding:6px 12px;border-bottom:1px solid #eef;text-align:right} th:first-child,td:first-child{text-align:left}
 h2{font-size:15px;margin:8px 0} .down{color:#b00020} .up{color:#0a7d32}
</style></head>
<body>
<h1>Switchyard</h1><div class="sub" id="updated">waiting for the first figures…</div>
<div class="tiles">
 <div class="tile"><div class="label">Requests / s</div><div class="value" id="throughput">–</div></div>
 <div class="tile"><div class="label">Tokens / s</div><div class="value" id="tokens">–</div></div>
 <div class="tile"><div class="label">Latency p50</div><div class="value" id="p50">–</div></div>
 <div class="tile"><div class="label">Latency p95</div><div class="value" id="p95">–</div></div>
 <div class="tile"><div class="label">Cache hit rate</div><div class="value" id="cache">–</div></div>
 <div class="tile"><div class="label">Spend (USD)</div><div class="value" id="cost">–</div></div>
</div>
<h2>Cost by tenant</h2>
<table id="tenants"><thead><tr><th>tenant</th><th>USD</th><th>tokens in</th><th>tokens out</th></tr></thead><tbody></tbody></table>
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th><th>in flight</th><th>capacity</th><th>lag</th><th>tokens/s</th></tr></thead><tbody></tbody></table>
<h2>Services</h2>
<table id="services"><thead><tr><th>service</th><th>metrics</th></tr></thead><tbody></tbody></table>
<script>
const fmt = (v, d = 1) => v === null || v === undefined ? "–" : Number(v).toFixed(d);
function rows(id, items) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...items.map(cells => {
    const tr = document.createElement("tr");
    tr.dataset.key = cells[0];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    return tr;
  }));
}
async function refresh() {
  try {
    const s = await (await fetch("/api/status", {cache: "no-store"})).json();
    if (!s.ready) return;
    document.getElementById("throughput").textContent = fmt(s.throughput.requests_per_s, 2);
    document.getElementById("tokens").textContent = fmt(s.throughput.tokens_per_s, 1);
    document.getElementById("p50").textContent = s.latency_ms.p50 === null ? "–" : fmt(s.latency_ms.p50, 0) + " ms";
    document.getElementById("p95").textContent = s.latency_ms.p95 === null ? "–" : fmt(s.latency_ms.p95, 0) + " ms";
    document.getElementById("cache").textContent = s.cache.hit_rate === null ? "–" : (100 * s.cache.hit_rate).toFixed(1) + " %";
    document.getElementById("cost").textContent = fmt(s.cost_usd, 6);
    rows("tenants", s.cost_by_tenant.map(t => [t.tenant, t.usd.toFixed(9), t.tokens_in, t.tokens_out]));
    rows("models", Object.entries(s.models).map(([m, v]) => [m, v.in_flight, v.capacity, v.lag, fmt(v.tokens_per_s, 1)]));
    rows("services", Object.entries(s.services).map(([n, ok]) => [n, ok ? "up" : "down"]));
    document.getElementById("updated").textContent =
      `updated ${new Date().toLocaleTimeString()} · rates over the last ${s.window_s} s · latency ${s.latency_ms.basis}` +
      ` · ${s.cache.answered} answers booked, ${s.dead_letters} dead letters`;
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach the stack: " + e;
  }
}
refresh(); setInterval(refresh, 2000);
</script>
</body></html>
"""
