"""The books in ClickHouse: cost records and quality scores, one DDL and one set of views for chDB and
for servers, through clickhouse-connect."""

from __future__ import annotations

import logging
import clickhouse_connect
from pydantic import BaseModel

from schemas import CostRecord
from schemas.quality import ScoreRecord
from shared.errors import ConfigError, DependencyUnavailable
from shared.settings import masked, scrubbed

log = logging.getLogger(__name__)

DATABASE = "switchyard"
TABLE = f"{DATABASE}.cost_records"
SCORES_TABLE = f"{DATABASE}.quality_scores"

# The columns a batch names, in the cost record's own field names: ts_ms is an EPHEMERAL column
# that `ts` is computed from, so the records' JSON goes in as it is (JSONEachRow), parsed by ClickHouse.
COLUMNS = [
    "request_id", "attempt", "ts_ms", "tenant", "route", "model", "priority", "status", "cache_hit",
    "tokens_in", "tokens_out", "cached_tokens", "cost_nano_usd", "latency_ms", "ttft_ms",
]

# The columns of a score record (schemas.quality.ScoreRecord); created_at_ms is EPHEMERAL, like ts_ms above:
# a score is booked in the hour its request was made, the same hour on every re-run.
SCORE_COLUMNS = [
    "request_id", "created_at_ms", "tenant", "route", "model", "suite_version", "score", "passed", "checks",
    "failed", "errors", "latency_ms", "confidence", "escalated",
]

# ReplacingMergeTree keyed on the whole record identity: a batch inserted twice (the sink died
# between insert and commit) collapses to one row per (request, attempt). Merges do that in
# the background, so every read goes through FINAL to count each record once.
DDL = [
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        request_id String,
        attempt UInt16,
        ts_ms Int64 EPHEMERAL,
        ts DateTime64(3, 'UTC') DEFAULT fromUnixTimestamp64Milli(ts_ms, 'UTC'),
        tenant LowCardinality(String),
        route LowCardinality(String),
        model LowCardinality(String),
        priority LowCardinality(String),
        status LowCardinality(String),
        cache_hit LowCardinality(String),
        tokens_in UInt32,
        tokens_out UInt32,
        cached_tokens UInt32,
        cost_nano_usd UInt64,
        latency_ms UInt32,
        ttft_ms Nullable(UInt32)
    )
    ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(ts)
    ORDER BY (tenant, route, model, toStartOfHour(ts), request_id, attempt)
    """,
    f"""
    CREATE VIEW IF NOT EXISTS {DATABASE}.cost_by_hour AS
    SELECT
        toStartOfHour(ts) AS hour, tenant, route, model,
        count() AS requests,
        sum(tokens_in) AS tokens_in,
        sum(tokens_out) AS tokens_out,
        sum(cost_nano_usd) AS cost_nano_usd,
        quantile(0.5)(latency_ms) AS p50_latency_ms,
        quantile(0.95)(latency_ms) AS p95_latency_ms
    FROM {TABLE} FINAL
    GROUP BY hour, tenant, route, model
    """,
    # Each request has exactly one attempt-0 record, so counting those counts requests once, however
    # many models it went on to (escalations and fallbacks are attempts 1, 2, ...).
    f"""
    CREATE VIEW IF NOT EXISTS {DATABASE}.cache_by_route AS
    SELECT
        toStartOfHour(ts) AS hour, route,
        countIf(attempt = 0) AS requests,
        countIf(attempt = 0 AND cache_hit = 'exact') AS exact_hits,
        countIf(attempt = 0 AND cache_hit = 'semantic') AS semantic_hits,
        countIf(attempt = 0 AND cache_hit = 'idempotent') AS repeats,
        countIf(attempt = 0 AND cache_hit != 'none') / greatest(countIf(attempt = 0), 1) AS hit_rate
    FROM {TABLE} FINAL
    GROUP BY hour, route
    """,
    f"""
    CREATE VIEW IF NOT EXISTS {DATABASE}.latency_by_route_model AS
    SELECT
        toStartOfHour(ts) AS hour, route, model,
        count() AS records,
        quantile(0.5)(latency_ms) AS p50_latency_ms,
        quantile(0.95)(latency_ms) AS p95_latency_ms,
        quantile(0.99)(latency_ms) AS p99_latency_ms,
        quantile(0.5)(ttft_ms) AS p50_ttft_ms,
        quantile(0.95)(ttft_ms) AS p95_ttft_ms
    FROM {TABLE} FINAL
    WHERE model != ''
    GROUP BY hour, route, model
    """,
    # What the same tokens would have cost on a reference model (the all-large-model baseline),
    # by tenant, route and hour. A parameterized view, since the reference price is the policy's:
    #   SELECT * FROM switchyard.savings_by_hour(in_nano = 2500, out_nano = 10000)
    # (`switchyard cost --versus MODEL` fills the prices in from the policy.) Answers from memory
    # used no tokens: their saving is not in it, so the figure understates what was saved.
    f"""
    CREATE VIEW IF NOT EXISTS {DATABASE}.savings_by_hour AS
    SELECT
        toStartOfHour(ts) AS hour, tenant, route,
        countIf(attempt = 0) AS requests,
        sum(cost_nano_usd) AS cost_nano_usd,
        sum(tokens_in) * {{in_nano:UInt64}} + sum(tokens_out) * {{out_nano:UInt64}} AS reference_nano_usd,
        if(reference_nano_usd = 0, NULL, 1 - cost_nano_usd / reference_nano_usd) AS saved
    FROM {TABLE} FINAL
    GROUP BY hour, tenant, route
    """,
    f"""
    CREATE VIEW IF NOT EXISTS {DATABASE}.escalation_by_route AS
    SELECT
        hour, route,
        count() AS requests,
        countIf(attempts > 1) AS handed_on,
        countIf(attempts > 1) / count() AS handed_on_rate
    FROM (
        SELECT toStartOfHour(min(ts)) AS hour, route, request_id, count() AS attempts
        FROM {TABLE} FINAL
        GROUP BY route, request_id
    )
    GROUP BY hour, route
    """,
    # Quality scores of sampled answers: numbers only, never text. One row per request (a sample
    # scored twice, after a crash, collapses like a cost record).
    f"""
    CREATE TABLE IF NOT EXISTS {SCORES_TABLE} (
        request_id String,
        created_at_ms Int64 EPHEMERAL,
        ts DateTime64(3, 'UTC') DEFAULT fromUnixTimestamp64Milli(created_at_ms, 'UTC'),
        tenant LowCardinality(String),
        route LowCardinality(String),
        model LowCardinality(String),
        suite_version LowCardinality(String),
        score Float32,
        passed Bool,
        checks Map(LowCardinality(String), Float32),
        failed Array(LowCardinality(String)),
        errors Array(LowCardinality(String)),
        latency_ms UInt32,
        confidence Nullable(Float32),
        escalated Bool
    )
    ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(ts)
    ORDER BY (tenant, route, model, toStartOfHour(ts), request_id)
    """,
    # The drift signals by hour (services/evaluator/drift.py compares each against its trailing baseline).
    f"""
    CREATE VIEW IF NOT EXISTS {DATABASE}.quality_by_hour AS
    SELECT
        toStartOfHour(ts) AS hour, tenant, route, model,
        count() AS samples,
        avg(score) AS mean_score,
        avg(passed) AS pass_rate,
        avg(latency_ms) AS mean_latency_ms,
        quantile(0.95)(latency_ms) AS p95_latency_ms,
        avg(escalated) AS escalation_rate,
        avg(confidence) AS mean_confidence
    FROM {SCORES_TABLE} FINAL
    GROUP BY hour, tenant, route, model
    """,
]


# Books written before ts_ms became the way in get it added; `ts` then takes its value from it.
MIGRATIONS = [
    f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS ts_ms Int64 EPHEMERAL",
    f"ALTER TABLE {TABLE} MODIFY COLUMN ts DateTime64(3, 'UTC') DEFAULT fromUnixTimestamp64Milli(ts_ms, 'UTC')",
]
# For reads through FINAL: a record and its replays share `ts`, so they always share a partition
# (toYYYYMM(ts)); FINAL then never merges across partitions, and a month's parts merge on their own.
FINAL_SETTINGS = {"do_not_merge_across_partitions_select_final": 1}
# Fields of the record that are not columns (schema_version) are skipped, not refused.
INSERT_SETTINGS = {"input_format_skip_unknown_fields": 1}


def rows_json(records: list[BaseModel]) -> bytes:
    """Cost or score records as JSONEachRow, canonical (what pydantic validated, written back out)."""
    return b"\n".join(r.model_dump_json().encode() for r in records)


class CostStore:
    def __init__(self, client):
        self._client = client

    @classmethod
    def connect(cls, dsn: str, *, ttl_days: int | None = None) -> CostStore:
        """Open the store at `dsn` (chdb:///abs/path or http(s)://...) and make sure its tables exist.
        `ttl_days`: drop records older than that (by the request's time); None keeps them all."""
        if dsn.startswith("chdb://") and not dsn.startswith("chdb:///"):
            raise ConfigError(f"a chDB DSN needs an absolute path (chdb:///abs/path), got {dsn!r}")
        # clickhouse-connect takes TLS from the port (443, 8443), not from the scheme: an https DSN on
        # another port would send its password over plain HTTP.
        secure = {"secure": True} if dsn.startswith("https://") else {}
        try:
            client = clickhouse_connect.get_client(dsn=dsn, **secure)
        except Exception as exc:  # clickhouse-connect raises several unrelated types on connect
            raise DependencyUnavailable(f"cannot open ClickHouse at {masked(dsn)}: {scrubbed(str(exc), dsn)}") from None
        store = cls(client)
        for statement in DDL:
            client.command(statement)
        if not client.command(f"SELECT count() FROM system.columns WHERE database = '{DATABASE}' "
                              "AND table = 'cost_records' AND name = 'ts_ms'"):
            for statement in MIGRATIONS:
                client.command(statement)
        if ttl_days is not None:
            client.command(f"ALTER TABLE {TABLE} MODIFY TTL toDateTime(ts) + INTERVAL {int(ttl_days)} DAY")
        return store

    def insert(self, records: list[CostRecord]) -> None:
        if records:
            self.insert_json(rows_json(records))

    def insert_json(self, rows: bytes) -> None:
        """Insert cost records given as JSONEachRow (validated CostRecords, one per line)."""
        if rows:
            self._client.raw_insert(TABLE, COLUMNS, rows, fmt="JSONEachRow", settings=INSERT_SETTINGS)

    def insert_scores(self, records: list[ScoreRecord]) -> None:
        if records:
            self._client.raw_insert(SCORES_TABLE, SCORE_COLUMNS, rows_json(records), fmt="JSONEachRow",
                                    settings=INSERT_SETTINGS)

    def query(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> list[dict]:
        result = self._client.query(sql, parameters=parameters, settings=settings)
        return [dict(zip(result.column_names, row)) for row in result.result_rows]

    def command(self, sql: str) -> None:
        self._client.command(sql)

    def close(self) -> None:
        self._client.close()
