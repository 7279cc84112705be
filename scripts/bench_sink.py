"""Cost books benchmark, on real parts: a Tansu broker and chDB (ClickHouse in-process), on this machine.

  sink   N cost records (default 500,000, 1,000 tenants, valid CostRecords as services write them)
         are produced onto the costs topic before the sink starts; then one Sink (the class
         `switchyard sink` runs, with its default batch size and flush interval) drains them into a
         fresh chDB. Throughput = records booked / time from the sink's first fetch to its last
         commit. Target >= 50,000 records/s. Afterwards the books are checked: every record is
         there once, and the total cost is exactly the sum produced.
  query  10,000,000 cost records (1,000 tenants, 8 routes, 4 models, 60 days) are loaded into a
         fresh chDB with INSERT ... SELECT FROM numbers() (loading them through Kafka would take
         minutes and measure the sink again), then `switchyard cost --by tenant` (the same report()
         function, through FINAL) runs over all of them, cold once and then warm. Target: under
         1 second. The same for --by route,model and for one tenant by hour, for comparison.

The broker runs on the same cores as the sink. Prints a table and writes JSON
(bench-results/sink.json by default).

    scripts/bench_sink                       # both, ~2-3 min on 2 cores
    scripts/bench_sink --records 200000 --rows 2000000
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402

import benchlib  # noqa: E402
from benchlib import columns, say  # noqa: E402

from schemas import CostRecord, now_ms  # noqa: E402
from services.cli.cost import report  # noqa: E402
from services.sink.service import Sink  # noqa: E402
from services.sink.store import TABLE, CostStore  # noqa: E402
from services.stack import infra  # noqa: E402
from shared import kafka  # noqa: E402
from shared.codec import encode  # noqa: E402
from shared.topics import COST_PARTITIONS, TopicSpec, Topics, cost_key  # noqa: E402

SINK_TARGET_PER_S = 50_000
QUERY_TARGET_S = 1.0


def cost_records(count: int, tenants: int, seed: int = 11) -> list[CostRecord]:
    rng = random.Random(seed)
    routes = ["chat", "code", "summarise", "extract", "support", "search", "agent", "batch-eval"]
    models = [("small", 20, 80), ("medium", 150, 600), ("large", 2500, 10000), ("big", 5000, 15000)]
    start = now_ms() - 3_600_000
    out = []
    for i in range(count):
        model, price_in, price_out = models[rng.randrange(4)]
        tokens_in, tokens_out = rng.randint(20, 4000), rng.randint(1, 800)
        hit = rng.random() < 0.1
        out.append(CostRecord(
            request_id=f"bench-{i:09d}", attempt=0 if rng.random() < 0.9 else 1, ts_ms=start + i % 3_600_000,
            tenant=f"tenant-{rng.randrange(tenants):04d}", route=routes[rng.randrange(len(routes))],
            model="" if hit else model, priority="standard", status="ok", cache_hit="exact" if hit else "none",
            tokens_in=0 if hit else tokens_in, tokens_out=0 if hit else tokens_out, cached_tokens=0,
            cost_nano_usd=0 if hit else tokens_in * price_in + tokens_out * price_out,
            latency_ms=rng.randint(5, 30_000), ttft_ms=None if hit else rng.randint(5, 3000),
        ))
    return out


async def produce(bootstrap: str, topic: str, records: list[CostRecord]) -> float:
    producer = kafka.producer(bootstrap, linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    try:
        started = time.monotonic()
        pending = []
        for record in records:
            pending.append(await producer.send(topic, encode(record), key=cost_key(record.request_id)))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        return time.monotonic() - started
    finally:
        await producer.stop()


async def bench_sink(count: int, tenants: int) -> dict:
    data = Path(tempfile.mkdtemp(prefix="bench-sink-"))
    broker = infra.start_broker(stdout=open(data / "broker.log", "wb"), stderr=subprocess.STDOUT)
    try:
        topics = Topics(f"bench{int(time.time())}")
        await kafka.prepare(broker.address, [TopicSpec(topics.costs, COST_PARTITIONS),
                                             TopicSpec(topics.dead_letter, 1)])
        say(f"making {count:,} cost records")
        records = cost_records(count, tenants)
        expected_cost = sum(r.cost_nano_usd for r in records)
        say(f"producing them onto {topics.costs} ({COST_PARTITIONS} partitions)")
        produce_s = await produce(broker.address, topics.costs, records)
        del records
        say(f"produced in {produce_s:.1f} s; starting the sink")
        store = CostStore.connect(f"chdb://{data / 'chdb'}")
        sink = Sink(bootstrap=broker.address, topics=topics, store=store)
        stop = asyncio.Event()
        started = time.monotonic()
        running = asyncio.create_task(sink.run(stop))
        while sink.booked < count:
            if running.done():
                running.result()
                raise RuntimeError("the sink stopped before booking every record")
            await asyncio.sleep(0.05)
        stop.set()
        await running
        busy_s = sink.last_booked_at - sink.first_taken_at
        booked = store.query(f"SELECT count() AS n, sum(cost_nano_usd) AS cost FROM {TABLE} FINAL")[0]
        store.close()
        exact = booked["n"] == count and booked["cost"] == expected_cost
        say(f"booked {sink.booked:,} in {busy_s:.2f} s: {count / busy_s:,.0f} records/s; books exact: {exact}")
        return {"records": count, "tenants": tenants, "produce_s": round(produce_s, 2),
                "from_start_s": round(sink.last_booked_at - started, 2), "busy_s": round(busy_s, 3),
                "records_per_s": round(count / busy_s), "books_exact": exact, "booked_rows": booked["n"],
                "target_per_s": SINK_TARGET_PER_S, "met": count / busy_s >= SINK_TARGET_PER_S and exact}
    finally:
        broker.stop()


def bench_query(rows: int, tenants: int, repeats: int) -> dict:
    data = Path(tempfile.mkdtemp(prefix="bench-books-"))
    store = CostStore.connect(f"chdb://{data / 'chdb'}")
    days = 60
    begin = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=days)
    say(f"loading {rows:,} cost records over {days} days into a fresh chDB")
    started = time.monotonic()
    chunk = 1_000_000
    for offset in range(0, rows, chunk):
        store.command(f"""
            INSERT INTO {TABLE} (request_id, attempt, ts, tenant, route, model, priority, status, cache_hit,
                                 tokens_in, tokens_out, cached_tokens, cost_nano_usd, latency_ms, ttft_ms)
            SELECT concat('q-', toString(number)), if(number % 10 = 9, 1, 0),
                   toDateTime64('{begin:%Y-%m-%d %H:%M:%S}', 3, 'UTC') + toIntervalMillisecond(
                       intDiv(number * {days * 86_400_000}, {rows})),
                   concat('tenant-', leftPad(toString(cityHash64(number) % {tenants}), 4, '0')),
                   ['chat', 'code', 'summarise', 'extract', 'support', 'search', 'agent', 'batch-eval'][
                       1 + cityHash64(number, 1) % 8],
                   ['small', 'medium', 'large', 'big'][1 + cityHash64(number, 2) % 4], 'standard', 'ok', 'none',
                   20 + cityHash64(number, 3) % 4000, 1 + cityHash64(number, 4) % 800, 0,
                   cityHash64(number, 5) % 10000000, 5 + cityHash64(number, 6) % 30000, 5 + number % 3000
            FROM numbers({offset}, {min(chunk, rows - offset)})
        """)
    load_s = time.monotonic() - started
    parts = store.query(f"SELECT count() AS n FROM system.parts WHERE database = 'switchyard' "
                        f"AND table = 'cost_records' AND active")[0]["n"]
    say(f"loaded in {load_s:.1f} s ({parts} active parts)")
    since = begin - timedelta(days=1)
    out = {"rows": rows, "tenants": tenants, "days": days, "load_s": round(load_s, 1), "active_parts": parts,
           "queries": []}
    for name, by, kwargs in [("by tenant", ["tenant"], {}), ("by route,model", ["route", "model"], {}),
                             ("one tenant by hour", ["hour"], {"tenant": "tenant-0042"})]:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = report(store, by, since=since, **kwargs)
            times.append(time.perf_counter() - started)
        counted = sum(r["requests"] for r in result)
        warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
        say(f"{name}: {len(result)} rows, cold {times[0]:.3f} s, warm median {warm:.3f} s")
        out["queries"].append({"query": name, "groups": len(result), "requests_counted": counted,
                               "cold_s": round(times[0], 3), "warm_median_s": round(warm, 3),
                               "runs_s": [round(t, 3) for t in times]})
    store.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="sink,query", help="sink, query or both (default)")
    parser.add_argument("--records", type=int, default=500_000, help="cost records the sink books")
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows the query runs over")
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each query (the first is cold)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "sink.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scenarios = {s.strip() for s in args.scenarios.split(",")}
    result: dict = {"machine": benchlib.machine("the Tansu broker runs on this same machine; chDB runs inside "
                                                "the benchmark process, as inside the sink")}
    targets = []
    if "sink" in scenarios:
        sink = result["sink"] = asyncio.run(bench_sink(args.records, args.tenants))
        targets.append(["sink", "records/s into ClickHouse", f"{sink['records_per_s']:,}", f">= {SINK_TARGET_PER_S:,}",
                        "yes" if sink["met"] else "NO"])
        targets.append(["sink", "books exact (count and nano-USD)", str(sink["books_exact"]), "True",
                        "yes" if sink["books_exact"] else "NO"])
    if "query" in scenarios:
        query = result["query"] = bench_query(args.rows, args.tenants, args.repeats)
        for q in query["queries"]:
            met = q["cold_s"] < QUERY_TARGET_S and q["warm_median_s"] < QUERY_TARGET_S
            targets.append(["query", f"cost {q['query']} over {args.rows:,} rows (cold / warm)",
                            f"{q['cold_s']:.3f} / {q['warm_median_s']:.3f} s",
                            f"< {QUERY_TARGET_S:.0f} s" if q["query"] == "by tenant" else "-",
                            ("yes" if met else "NO") if q["query"] == "by tenant" else "-"])
    result["targets"] = [dict(zip(["scenario", "measure", "measured", "target", "met"], t)) for t in targets]
    print()
    print(columns(["scenario", "measure", "measured", "target", "met?"], targets))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
