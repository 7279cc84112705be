"""`switchyard batch submit|status`: jobs in the OpenAI Batch file format, at batch priority.

A job is its file, route and tenant: its id is a hash of the three, so running the same command
again resumes the job instead of starting another. Every line becomes a request whose bytes are
the same on every run (id `<job>.<line>`, created at the job's first submission): the job's
results collect on its own reply topic, a resumed run reads them first and publishes only the
lines that have none, and a line it publishes again that the router has already forwarded is
recognised as a redelivery and skipped (services/router/seen.py). So no line runs, or is
billed, twice. The job's progress is kept on the compacted batches topic, where
`batch status ID` reads it from any machine that reaches the broker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from schemas import BadLine, BatchJob, InferenceRequest, InferenceResult, Priority, Status, now_ms
from schemas.batch import MAX_BAD_LINES_KEPT
from services.cli.policy import bootstrap_of
from shared import kafka
from shared import openai_format as oa
from shared.codec import decode, encode
from shared.errors import ConfigError, UndecodableMessage
from shared.settings import Settings
from shared.topics import Topics, request_key

log = logging.getLogger(__name__)

MAX_CUSTOM_ID = 256
UPDATE_EVERY_S = 2.0
BUILDERS = {oa.CHAT: oa.chat_request, oa.COMPLETIONS: oa.completion_request}


@dataclass(frozen=True)
class Line:
    number: int
    custom_id: str
    url: str
    request: InferenceRequest


def job_id(data: bytes, route: str, tenant: str) -> str:
    digest = hashlib.blake2b(data + b"\0" + route.encode() + b"\0" + tenant.encode(), digest_size=8).hexdigest()
    return f"batch_{digest}"


def parse(data: bytes, *, job: str, route: str, tenant: str, created_ms: int) -> tuple[list[Line], list[BadLine], int]:
    """The file's good lines as requests, its bad lines with their numbers and why, and how many lines it has."""
    lines: list[Line] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    total = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        total += 1
        custom_id = None
        try:
            item = orjson.loads(raw)
            if not isinstance(item, dict):
                raise oa.BadRequest("a line must be a JSON object")
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
                custom_id = None
                raise oa.BadRequest(f"custom_id: a string of 1 to {MAX_CUSTOM_ID} characters is required")
            if custom_id in seen:
                raise oa.BadRequest(f"custom_id {custom_id!r} is already used on line {seen[custom_id]}")
            seen[custom_id] = number
            if item.get("method", "POST") != "POST":
                raise oa.BadRequest(f"method: only POST is supported, got {item.get('method')!r}")
            url = item.get("url")
            if url not in BUILDERS:
                raise oa.BadRequest(f"url: one of {', '.join(BUILDERS)} is supported, got {url!r}")
            body = item.get("body")
            if isinstance(body, dict) and body.get("stream"):
                raise oa.BadRequest("body.stream: a batch line cannot stream")
            request = BUILDERS[url](body, tenant=tenant, route=route, reply_to=job, priority=Priority.batch,
                                    id=f"{job}.{number}", created_at_ms=created_ms)
        except orjson.JSONDecodeError as exc:
            bad.append(BadLine(line=number, error=f"not valid JSON: {exc}"))
            continue
        except oa.BadRequest as exc:
            bad.append(BadLine(line=number, custom_id=custom_id, error=str(exc)))
            continue
        lines.append(Line(number, custom_id, url, request))
    return lines, bad, total


def output_line(line: Line, result: InferenceResult) -> dict:
    """One line of the OpenAI batch output format."""
    if result.status == Status.ok:
        created = (line.request.created_at_ms + result.latency.total_ms) // 1000  # when it was answered
        body = (oa.chat_completion if line.url == oa.CHAT else oa.text_completion)(result, created)
        status = 200
    else:
        status, body, _ = oa.error_status(result)
    return {"id": f"batch_req_{result.request_id}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": result.request_id, "body": body}, "error": None}


def error_line(bad: BadLine) -> dict:
    return {"id": None, "custom_id": bad.custom_id, "response": None,
            "error": {"code": "invalid_line", "message": f"line {bad.line}: {bad.error}", "line": bad.line}}


class Progress:
    """A progress bar with throughput and ETA on a terminal; a line every few seconds elsewhere."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self._stream = stream
        self._tty = stream.isatty()
        self._started = time.monotonic()
        self._first: int | None = None
        self._last_line = 0.0

    def show(self, answered: int, ok: int, errors: int, published: int, final: bool = False) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = answered  # answered before this run: not this run's throughput
        if not (self._tty or final or now - self._last_line >= 5.0):
            return
        self._last_line = now
        done_here = answered - self._first
        elapsed = max(now - self._started, 1e-6)
        rate = done_here / elapsed
        left = self.total - answered
        eta = f"{left / rate:,.0f} s" if rate > 0 and left else ("0 s" if not left else "?")
        share = answered / self.total if self.total else 1.0
        bar = "#" * int(share * 30)
        text = (f"[{bar:<30}] {answered:,}/{self.total:,} {share:6.1%}  {rate:,.1f}/s  ETA {eta}  "
                f"ok {ok:,}  errors {errors:,}  published {published:,}")
        if self._tty:
            self._stream.write("\r" + text + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()


class Results:
    """Reads a job's reply topic from its beginning: the final result of each of its requests."""

    def __init__(self, bootstrap: str, topic: str, ids: set[str] | None = None):
        self._bootstrap = bootstrap
        self._topic = topic
        self._ids = ids  # the job's requests: anything else on the topic is not counted
        self.by_id: dict[str, InferenceResult] = {}
        self.ok = 0
        self.pending: set[str] = set()  # published by this run, not answered yet
        self._consumer = None

    async def start(self) -> None:
        self._consumer = kafka.consumer(self._bootstrap, group_id=None, auto_offset_reset="earliest")
        await self._consumer.start()
        async for record in kafka.from_start(self._consumer, self._topic):  # what is there already
            self._take(record)

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for records in (await self._consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    self._take(record)

    def _take(self, record) -> None:
        try:
            result = decode(InferenceResult, record.value)
        except UndecodableMessage:
            return  # deltas (a job does not stream) or foreign records: not results
        if result.request_id in self.by_id or (self._ids is not None and result.request_id not in self._ids):
            return
        self.by_id[result.request_id] = result
        self.ok += result.status == Status.ok
        self.pending.discard(result.request_id)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()


async def read_job(bootstrap: str, topics: Topics, job: str) -> BatchJob | None:
    """The latest record of `job` on the batches topic, or None."""
    consumer = kafka.consumer(bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    found = None
    try:
        async for record in kafka.from_start(consumer, topics.batches):
            if record.key == job.encode():
                try:
                    found = decode(BatchJob, record.value)
                except UndecodableMessage as exc:
                    log.warning("ignoring an unreadable batch record at offset %d: %s", record.offset, exc)
        return found
    finally:
        await consumer.stop()


def submit(settings: Settings, path: Path, *, route: str, tenant: str, rate: float, max_in_flight: int,
           output: Path | None, timeout_s: float) -> int:
    if rate <= 0 or max_in_flight < 1:
        raise ConfigError("--rate must be above 0 and --max-in-flight at least 1")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    output = output or path.with_name(path.name.removesuffix(".jsonl") + ".output.jsonl")
    return asyncio.run(_submit(settings, bootstrap_of(settings), path, data, route=route, tenant=tenant, rate=rate,
                               max_in_flight=max_in_flight, output=output, timeout_s=timeout_s))


async def _submit(settings: Settings, bootstrap: str, path: Path, data: bytes, *, route: str, tenant: str,
                  rate: float, max_in_flight: int, output: Path, timeout_s: float) -> int:
    topics = settings.topics
    job = job_id(data, route, tenant)
    await kafka.prepare(bootstrap, [s for s in topics.plan([]) if s.name in (topics.batches, *topics.all_requests)]
                        + [topics.reply_spec(job)], settings.replication_factor)
    before = await read_job(bootstrap, topics, job)
    created_ms = before.created_ms if before else now_ms()
    lines, bad, total = parse(data, job=job, route=route, tenant=tenant, created_ms=created_ms)
    for b in bad:
        print(f"{path}:{b.line}: {b.error}", file=sys.stderr)
    record = BatchJob(id=job, tenant=tenant, route=route, file=str(path), file_sha256=hashlib.sha256(data).hexdigest(),
                      lines=total, good=len(lines), bad=len(bad), bad_lines=bad[:MAX_BAD_LINES_KEPT],
                      created_ms=created_ms, updated_ms=now_ms(), host=socket.gethostname(), output=str(output),
                      published=before.published if before else 0)
    results = Results(bootstrap, topics.replies(job), {line.request.id for line in lines})
    await results.start()
    todo = [line for line in lines if line.request.id not in results.by_id]
    verb = "resuming" if before else "starting"
    print(f"batch {job}: {verb}; {total} lines, {len(bad)} bad, {len(lines) - len(todo)} answered before, "
          f"{len(todo)} to run (tenant {tenant}, route {route}); `switchyard batch status {job}` shows it anywhere",
          file=sys.stderr, flush=True)

    producer = kafka.producer(bootstrap)
    await producer.start()
    stop = asyncio.Event()
    following = asyncio.create_task(results.follow(stop))
    progress = Progress(len(lines))
    published = record.published

    def counts() -> tuple[int, int, int]:
        answered = len(results.by_id)
        return answered, results.ok, answered - results.ok

    async def save(state: str) -> None:
        answered, _, _ = counts()
        nonlocal record
        record = record.model_copy(update={"published": published, "answered": answered, "state": state,
                                           "updated_ms": now_ms()})
        await producer.send_and_wait(topics.batches, encode(record), key=job.encode())

    async def report() -> None:
        while not stop.is_set():
            progress.show(*counts(), published)
            await save("running")
            try:
                await asyncio.wait_for(stop.wait(), UPDATE_EVERY_S)
            except asyncio.TimeoutError:
                pass

    reporting = asyncio.create_task(report())
    state = "stopped"
    try:
        interval = 1.0 / rate
        next_at = time.monotonic()
        for line in todo:
            while len(results.pending) >= max_in_flight:
                await asyncio.sleep(0.05)
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + interval, time.monotonic() - 1.0)  # a short stall may catch up, not burst
            await producer.send(topics.requests(Priority.batch), encode(line.request), key=request_key(route))
            if line.request.id not in results.by_id:
                results.pending.add(line.request.id)
            published += 1
        await producer.flush()
        deadline = time.monotonic() + timeout_s
        while len(results.by_id) < len(lines) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        answered, ok, errors = counts()
        state = "done" if answered == len(lines) else "stopped"
    finally:
        stop.set()
        await asyncio.gather(reporting, following, return_exceptions=True)
        answered, ok, errors = counts()
        progress.show(answered, ok, errors, published, final=True)
        try:
            await asyncio.shield(save(state))
        finally:
            await producer.stop()
            await results.stop()
            _write(output, lines, bad, results.by_id)
    unanswered = len(lines) - answered
    print(f"batch {job}: {answered} of {len(lines)} lines answered ({ok} ok, {errors} errors), {len(bad)} bad lines; "
          f"results in {output}" + (f", bad lines in {_errors_path(output)}" if bad else ""), file=sys.stderr)
    if unanswered:
        print(f"batch {job}: {unanswered} lines have no answer yet; run the same command again to resume",
              file=sys.stderr)
    return 0 if not (bad or errors or unanswered) else 1


def _errors_path(output: Path) -> Path:
    """requests.output.jsonl → requests.errors.jsonl; any other name gets .errors.jsonl added."""
    stem = output.name.removesuffix(".jsonl").removesuffix(".output")
    return output.with_name(stem + ".errors.jsonl")


def _write(output: Path, lines: list[Line], bad: list[BadLine], results: dict[str, InferenceResult]) -> None:
    """Results in input order; a line without a result yet is left out (a resumed run adds it)."""
    with output.open("wb") as out:
        for line in lines:
            if line.request.id in results:
                out.write(orjson.dumps(output_line(line, results[line.request.id])) + b"\n")
    errors = _errors_path(output)
    if bad:
        errors.write_bytes(b"".join(orjson.dumps(error_line(b)) + b"\n" for b in bad))
    else:
        errors.unlink(missing_ok=True)


def status(settings: Settings, job: str, as_json: bool) -> int:
    return asyncio.run(_status(settings, bootstrap_of(settings), job, as_json))


async def _status(settings: Settings, bootstrap: str, job: str, as_json: bool) -> int:
    topics = settings.topics
    record = await read_job(bootstrap, topics, job)
    if record is None:
        raise ConfigError(f"no batch job {job!r} on {topics.batches}")
    results = Results(bootstrap, topics.replies(job))
    await results.start()
    await results.stop()
    mine = [r for r in results.by_id.values() if r.request_id.startswith(f"{job}.")]
    by_status: dict[str, int] = {}
    for r in mine:
        key = r.status.value if r.status == Status.ok else f"{r.status.value}:{r.error.code if r.error else '-'}"
        by_status[key] = by_status.get(key, 0) + 1
    answered = len(mine)
    state = "done" if answered >= record.good else record.state
    report = {"id": job, "tenant": record.tenant, "route": record.route, "file": record.file, "lines": record.lines,
              "good": record.good, "bad": record.bad, "published": record.published, "answered": answered,
              "pending": max(0, record.good - answered), "results": by_status, "state": state,
              "created": _iso(record.created_ms), "updated": _iso(record.updated_ms), "host": record.host,
              "output": record.output, "bad_lines": [b.model_dump() for b in record.bad_lines]}
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    share = answered / record.good if record.good else 1.0
    print(f"batch {job}  ({state})")
    for label, value in (("tenant / route", f"{record.tenant} / {record.route}"), ("file", record.file),
                         ("lines", f"{record.lines} ({record.good} good, {record.bad} bad)"),
                         ("answered", f"{answered} of {record.good} ({share:.1%}), {report['pending']} pending"),
                         ("results", ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())) or "none yet"),
                         ("published", str(record.published)),
                         ("submitted", f"{report['created']} from {record.host}"), ("last update", report["updated"]),
                         ("output", record.output)):
        print(f"  {label:<15} {value}")
    for b in record.bad_lines[:20]:
        print(f"  bad line {b.line}: {b.error}")
    if record.bad > 20:
        print(f"  ... and {record.bad - 20} more bad lines")
    return 0


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))
