"""A password in SWITCHYARD_REDIS_URL against a real redis-server started with --requirepass: the
services' connection gets in with it, stops with a clear error without it, and never logs it."""

from __future__ import annotations

import logging
import subprocess

import pytest

from services.stack import infra
from shared.errors import ConfigError
from shared.redis_conn import connect

pytestmark = pytest.mark.integration

PASSWORD = "redis-pw-58c1e9-do-not-leak"


@pytest.fixture(scope="module")
def port(tmp_path_factory) -> int:
    port = infra.free_port()
    command = infra.redis_command(port, tmp_path_factory.mktemp("redis-auth")) + ["--requirepass", PASSWORD]
    proc = infra.Process("redis", subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                         f"redis://127.0.0.1:{port}/0")
    infra.wait_for_port(port, 15, "redis-server", proc.proc)
    yield port
    proc.stop()


async def test_the_password_in_the_url_lets_the_service_in_and_stays_out_of_the_log(port, caplog):
    caplog.set_level(logging.INFO)

    redis = await connect(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    try:
        await redis.set("switchyard:auth-check", "ok")
        assert await redis.get("switchyard:auth-check") == b"ok"
    finally:
        await redis.aclose()

    assert f"Redis at redis://:***@127.0.0.1:{port}/0" in caplog.messages
    assert PASSWORD not in caplog.text


async def test_without_the_password_the_service_stops_saying_which_setting(port):
    with pytest.raises(ConfigError, match="refused the credentials of SWITCHYARD_REDIS_URL"):
        await connect(f"redis://127.0.0.1:{port}/0")


async def test_a_wrong_password_is_refused_and_never_repeated(port, caplog):
    wrong = "not-the-password-0b7d"

    # A worker may go on without Redis, but not with credentials that will never work.
    with pytest.raises(ConfigError) as raised:
        await connect(f"redis://default:{wrong}@127.0.0.1:{port}/0", required=False)

    assert f"redis://default:***@127.0.0.1:{port}/0" in str(raised.value)
    assert wrong not in str(raised.value) and wrong not in caplog.text
