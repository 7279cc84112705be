"""Settings are validated once at start, and a bad one is named."""

import pytest

from shared.errors import ConfigError
from shared.settings import Settings


def test_defaults_leave_the_local_stack_to_start_what_is_missing(tmp_path):
    settings = Settings.from_env({"SWITCHYARD_DATA_DIR": str(tmp_path)})
    assert settings.bootstrap is None and settings.redis_url is None
    assert settings.dsn() == f"chdb://{tmp_path}/chdb"
    assert settings.topics.requests("batch") == "switchyard.requests.batch"
    assert settings.kafka_fetch_wait_ms == 50


def test_a_fetch_wait_is_taken_in_milliseconds():
    assert Settings.from_env({"SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS": "1000"}).kafka_fetch_wait_ms == 1000


@pytest.mark.parametrize("name, value", [
    ("SWITCHYARD_CLICKHOUSE_DSN", "mysql://x"),
    ("SWITCHYARD_REDIS_URL", "localhost:6379"),
    ("SWITCHYARD_REPLICATION_FACTOR", "zero"),
    ("SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS", "0"),
    ("SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS", "1s"),
])
def test_a_bad_setting_is_named(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize("dsn", ["chdb:///var/lib/x", "http://clickhouse:8123", "https://u:p@ch.internal:8443"])
def test_clickhouse_dsns_that_clickhouse_connect_honours_are_accepted(dsn):
    assert Settings.from_env({"SWITCHYARD_CLICKHOUSE_DSN": dsn}).dsn() == dsn


@pytest.mark.parametrize("dsn", ["clickhouse://h:9000", "https://ch.internal", "chdb://relative/path"])
def test_clickhouse_dsns_that_would_connect_somewhere_else_are_refused(dsn):
    with pytest.raises(ConfigError, match="SWITCHYARD_CLICKHOUSE_DSN"):
        Settings.from_env({"SWITCHYARD_CLICKHOUSE_DSN": dsn})


@pytest.mark.parametrize("setting, on_path, off_path", [(None, 50, 500), ("1000", 1000, 1000)])
async def test_consumers_off_the_request_path_wait_longer_at_the_broker(monkeypatch, setting, on_path, off_path):
    # aiokafka sends this wait in every fetch; an idle consumer asks the broker once per wait.
    from shared import kafka

    if setting is None:
        monkeypatch.delenv("SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS", raising=False)
    else:
        monkeypatch.setenv("SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS", setting)
    kafka.fetch_wait_ms.cache_clear()
    try:
        waits = [kafka.consumer("127.0.0.1:9", group_id=None, off_path=off)._fetch_max_wait_ms  # noqa: SLF001
                 for off in (False, True)]
    finally:
        kafka.fetch_wait_ms.cache_clear()
    assert waits == [on_path, off_path]
