"""`switchyard cost`: what tenants, routes and models cost, read from the books in ClickHouse.

    switchyard cost                                  # by tenant, the last 24 hours
    switchyard cost --by route,model --since 7d
    switchyard cost --by hour --tenant acme --json

Money stays exact to the nano-USD until it is printed. Each figure comes from the cost records
through FINAL, so a record written twice counts once. `vs <model>` is what the same tokens would
have cost on the reference model (by default the dearest model of the policy's hard tier), and
`saved` the share of that the platform did not spend; answers from memory used no tokens, so
their saving is not in it.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

from schemas import PolicySet
from services.sink.store import FINAL_SETTINGS, TABLE, CostStore
from shared.errors import ConfigError
from shared.settings import masked

DIMENSIONS = {"tenant": "tenant", "route": "route", "model": "model", "hour": "toStartOfHour(ts)"}
_SPAN = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
NANO_PER_USD = 10**9


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """'90m', '24h', '7d', '2w' back from now, or an ISO date/time (UTC unless it says otherwise)."""
    now = now or datetime.now(timezone.utc)
    match = _SPAN.match(value.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(f"--since takes a span like 24h or 7d, or an ISO date/time; got {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def parse_by(value: str) -> list[str]:
    dims = [d.strip() for d in value.split(",") if d.strip()]
    unknown = [d for d in dims if d not in DIMENSIONS]
    if not dims or unknown:
        raise ConfigError(f"--by takes a comma-separated list of {', '.join(DIMENSIONS)}; got {value!r}")
    return list(dict.fromkeys(dims))


def filters(params: dict, *, since: datetime, until: datetime | None, tenant: str | None,
            route: str | None) -> list[str]:
    """The WHERE conditions of a report over the books' `ts`, tenant and route; their values go into params."""
    where = ["ts >= {since:DateTime64(3, 'UTC')}"]
    params["since"] = since
    for name, value, condition in (("until", until, "ts < {until:DateTime64(3, 'UTC')}"),
                                   ("tenant", tenant, "tenant = {tenant:String}"),
                                   ("route", route, "route = {route:String}")):
        if value is not None:
            where.append(condition)
            params[name] = value
    return where


def reference_model(policies: PolicySet, name: str | None) -> str:
    if name is not None:
        if name not in policies.models:
            raise ConfigError(f"--versus {name!r} is not a model of the policy ({', '.join(policies.models)})")
        return name
    hard = policies.tiers[policies.hard_rank]
    dearest = sorted(((spec.price.out_nano_usd_per_token, spec.price.in_nano_usd_per_token, m)
                      for m, spec in policies.models.items() if spec.tier == hard), reverse=True)
    if not dearest:
        raise ConfigError(f"the policy has no model of its hard tier {hard!r}: name one with --versus")
    return dearest[0][2]


def report(store: CostStore, by: list[str], *, since: datetime, until: datetime | None = None,
           tenant: str | None = None, route: str | None = None, versus=None) -> list[dict]:
    """One row per group: requests, tokens, exact cost, memory answers, hand-offs, latency, and
    (with `versus`, a ModelPrice) what the same tokens would have cost on that model."""
    params: dict = {"vin": 0, "vout": 0}
    where = filters(params, since=since, until=until, tenant=tenant, route=route)
    if versus is not None:
        params.update(vin=versus.in_nano_usd_per_token, vout=versus.out_nano_usd_per_token)
    keys = ", ".join(f"{DIMENSIONS[d]} AS {d}" for d in by)
    rows = store.query(
        f"""
        SELECT {keys},
            countIf(attempt = 0) AS requests,
            sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out, sum(cached_tokens) AS cached_tokens,
            sum(cost_nano_usd) AS cost_nano_usd,
            countIf(attempt = 0 AND cache_hit != 'none') AS from_memory,
            countIf(attempt > 0) AS handoffs,
            countIf(status != 'ok') AS not_ok,
            quantile(0.5)(latency_ms) AS p50_latency_ms, quantile(0.95)(latency_ms) AS p95_latency_ms,
            tokens_in * {{vin:UInt64}} + tokens_out * {{vout:UInt64}} AS versus_nano_usd
        FROM {TABLE} FINAL
        WHERE {' AND '.join(where)}
        GROUP BY {', '.join(by)}
        ORDER BY cost_nano_usd DESC, {', '.join(by)}
        """,
        params,
        settings=FINAL_SETTINGS,
    )
    for row in rows:
        if "hour" in row and isinstance(row["hour"], datetime):
            row["hour"] = row["hour"].replace(tzinfo=timezone.utc).isoformat(timespec="minutes")
        for key in ("p50_latency_ms", "p95_latency_ms"):
            row[key] = round(float(row[key]), 1)
        if versus is None:
            del row["versus_nano_usd"]
        else:
            row["saved"] = round(1 - row["cost_nano_usd"] / row["versus_nano_usd"], 4) if row["versus_nano_usd"] else None
    return rows


def _usd(nano: int) -> str:
    whole, rest = divmod(int(nano), NANO_PER_USD)
    return f"{whole}.{rest:09d}"


def render(rows: list[dict], by: list[str], versus: str | None) -> str:
    head = [*by, "requests", "tokens in", "tokens out", "USD", "memory", "handoffs", "not ok", "p50 ms", "p95 ms"]
    if versus:
        head += [f"USD vs {versus}", "saved"]
    lines = []
    for row in rows:
        line = [str(row[d]) or "-" for d in by] + [str(row["requests"]), str(row["tokens_in"]), str(row["tokens_out"]),
                                           _usd(row["cost_nano_usd"]), str(row["from_memory"]), str(row["handoffs"]),
                                           str(row["not_ok"]), f"{row['p50_latency_ms']:.0f}",
                                           f"{row['p95_latency_ms']:.0f}"]
        if versus:
            line += [_usd(row["versus_nano_usd"]), "-" if row["saved"] is None else f"{row['saved']:.0%}"]
        lines.append(line)
    if rows:
        total = {k: sum(r[k] for r in rows) for k in ("requests", "tokens_in", "tokens_out", "cost_nano_usd")}
        line = ["total"] + [""] * (len(by) - 1) + [str(total["requests"]), str(total["tokens_in"]),
                                                    str(total["tokens_out"]), _usd(total["cost_nano_usd"])]
        if versus:
            against = sum(r["versus_nano_usd"] for r in rows)
            line += [""] * 5 + [_usd(against), f"{1 - total['cost_nano_usd'] / against:.0%}" if against else "-"]
        lines.append(line)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    if not rows:
        out.append("(no cost records in that span)")
    return "\n".join(out)


def main(settings, *, by: str, since: str, until: str | None, tenant: str | None, route: str | None,
         versus: str | None, as_json: bool) -> int:
    from services.router.policy import load

    dims = parse_by(by)
    start, end = parse_since(since), parse_since(until) if until else None
    policies = load(settings.policy_file)
    model = reference_model(policies, versus)
    store = CostStore.connect(settings.dsn())
    try:
        rows = report(store, dims, since=start, until=end, tenant=tenant, route=route,
                      versus=policies.models[model].price)
    finally:
        store.close()
    if as_json:
        print(json.dumps({"by": dims, "since": start.isoformat(), "until": end.isoformat() if end else None,
                          "versus": model, "rows": rows}, indent=2, default=str))
    else:
        print(f"Cost from {start.isoformat(timespec='seconds')}" + (f" to {end.isoformat(timespec='seconds')}" if end else "")
              + f" ({masked(settings.dsn())}), USD exact to the nano-USD:")
        print(render(rows, dims, model))
    return 0
