"""Credentials stay out of sight: Kafka SASL/TLS settings are checked at start and reach every client
the code builds, passwords in URLs and DSNs are masked wherever they are shown, and a provider key
never comes back out of an error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import traceback
from http.server import BaseHTTPRequestHandler

import certifi
import orjson
import pytest
from aiokafka.errors import KafkaConnectionError

from schemas.policy import ProviderSpec
from schemas.request import InferenceRequest
from services.cli import fleet
from services.sink.store import CostStore
from services.worker.provider import ProviderBackend
from shared import kafka
from shared.errors import ConfigError, DependencyUnavailable, ProviderRejected, ProviderUnavailable
from shared.redis_conn import connect
from shared.settings import KafkaSecurity, Secret, Settings, masked, scrubbed
from shared.topics import TopicSpec
from tests.http_fakes import serving

PASSWORD = "kafka-pw-3e8b1f-do-not-leak"
KEY = "sk-sec-9d2c4a71e0b5-do-not-leak"
KEY_ENV = "SWITCHYARD_TEST_SECURITY_KEY"
SASL = {"SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SWITCHYARD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "SWITCHYARD_KAFKA_SASL_USERNAME": "switchyard", "SWITCHYARD_KAFKA_SASL_PASSWORD": PASSWORD}
TLS_RECORD = b"\x16\x03"  # a TLS handshake record: what a client that speaks TLS sends first


# ------------------------------------------------------------------------------------- Secret
def test_a_secret_shows_as_stars_however_it_is_printed():
    secret = Secret(PASSWORD)

    assert repr(secret) == str(secret) == f"{secret}" == "***"
    assert secret.reveal() == PASSWORD
    assert secret == Secret(PASSWORD) and secret != Secret("other")


def test_settings_in_a_log_line_carry_no_password():
    settings = Settings.from_env({**SASL, "SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                  "SWITCHYARD_REDIS_URL": f"redis://app:{PASSWORD}@redis:6379/0",
                                  "SWITCHYARD_CLICKHOUSE_DSN": f"https://switchyard:{PASSWORD}@ch:8443"})

    shown = repr(settings)
    assert PASSWORD not in shown
    assert "redis://app:***@redis:6379/0" in shown and "https://switchyard:***@ch:8443" in shown
    assert "sasl_password=***" in shown and "sasl_username='switchyard'" in shown
    # The values themselves are untouched: the clients need them.
    assert settings.redis_url == f"redis://app:{PASSWORD}@redis:6379/0"
    assert settings.kafka_security.sasl_password.reveal() == PASSWORD


# ----------------------------------------------------------------------------- Kafka settings
def test_plaintext_is_the_default_and_needs_nothing():
    security = KafkaSecurity.from_env({})

    assert security == KafkaSecurity() and not security.sasl and not security.tls
    assert kafka.security_options(security) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_settings_are_read_whole(tmp_path):
    security = Settings.from_env({**SASL, "SWITCHYARD_KAFKA_SASL_MECHANISM": "scram-sha-512",
                                  "SWITCHYARD_KAFKA_SSL_CAFILE": certifi.where()}).kafka_security

    assert (security.protocol, security.sasl_mechanism, security.sasl_username) == \
        ("SASL_SSL", "SCRAM-SHA-512", "switchyard")
    assert security.sasl_password.reveal() == PASSWORD and str(security.ssl_cafile) == certifi.where()


def test_the_password_may_come_from_a_mounted_secret_file(tmp_path):
    path = tmp_path / "kafka-password"
    path.write_text(PASSWORD + "\n")
    env = {**SASL, "SWITCHYARD_KAFKA_SASL_PASSWORD": "", "SWITCHYARD_KAFKA_SASL_PASSWORD_FILE": str(path)}

    assert KafkaSecurity.from_env(env).sasl_password.reveal() == PASSWORD


@pytest.mark.parametrize("change, named", [
    ({"SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "TLS"}, "SWITCHYARD_KAFKA_SECURITY_PROTOCOL"),
    ({"SWITCHYARD_KAFKA_SASL_MECHANISM": ""}, "SWITCHYARD_KAFKA_SASL_MECHANISM"),
    ({"SWITCHYARD_KAFKA_SASL_MECHANISM": "GSSAPI"}, "SWITCHYARD_KAFKA_SASL_MECHANISM"),
    ({"SWITCHYARD_KAFKA_SASL_USERNAME": ""}, "SWITCHYARD_KAFKA_SASL_USERNAME"),
    ({"SWITCHYARD_KAFKA_SASL_PASSWORD": " "}, "SWITCHYARD_KAFKA_SASL_PASSWORD"),
    ({"SWITCHYARD_KAFKA_SASL_PASSWORD_FILE": "/run/secrets/kafka"}, "not both"),
    ({"SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "SSL"}, "SWITCHYARD_KAFKA_SASL_MECHANISM is set"),
    ({"SWITCHYARD_KAFKA_SSL_CAFILE": "/nowhere/ca.pem"}, "SWITCHYARD_KAFKA_SSL_CAFILE names /nowhere/ca.pem"),
    ({"SWITCHYARD_KAFKA_SSL_KEYFILE": certifi.where()}, "SWITCHYARD_KAFKA_SSL_KEYFILE needs"),
    ({"SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SWITCHYARD_KAFKA_SSL_CAFILE": certifi.where()},
     "SWITCHYARD_KAFKA_SSL_CAFILE is set"),
])
def test_a_bad_kafka_security_setting_is_named_at_start_and_the_password_is_not(change, named):
    with pytest.raises(ConfigError, match=named) as raised:
        Settings.from_env({**SASL, **change})

    assert PASSWORD not in str(raised.value)


def test_sasl_without_its_credentials_names_each_one_missing():
    with pytest.raises(ConfigError) as raised:
        KafkaSecurity.from_env({"SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})

    for name in ("SWITCHYARD_KAFKA_SASL_MECHANISM", "SWITCHYARD_KAFKA_SASL_USERNAME",
                 "SWITCHYARD_KAFKA_SASL_PASSWORD (or SWITCHYARD_KAFKA_SASL_PASSWORD_FILE)"):
        assert name in str(raised.value)


@pytest.mark.parametrize("content, said", [(None, "cannot be read"), ("\n", "is empty")])
def test_a_password_file_that_gives_nothing_is_named(tmp_path, content, said):
    path = tmp_path / "kafka-password"
    if content is not None:
        path.write_text(content)
    env = {**SASL, "SWITCHYARD_KAFKA_SASL_PASSWORD": "", "SWITCHYARD_KAFKA_SASL_PASSWORD_FILE": str(path)}

    with pytest.raises(ConfigError, match=f"SWITCHYARD_KAFKA_SASL_PASSWORD_FILE names {path}, which {said}"):
        KafkaSecurity.from_env(env)


# ------------------------------------------------------------------------ Kafka client options
def test_sasl_ssl_becomes_aiokafka_arguments_with_a_verifying_tls_context():
    options = kafka.security_options(KafkaSecurity.from_env({**SASL, "SWITCHYARD_KAFKA_SSL_CAFILE": certifi.where()}))

    context = options.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert options == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                       "sasl_plain_username": "switchyard", "sasl_plain_password": PASSWORD}


def test_ssl_without_a_ca_file_trusts_the_system_cas():
    options = kafka.security_options(KafkaSecurity.from_env({"SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "ssl"}))

    assert options["security_protocol"] == "SSL" and "sasl_plain_password" not in options
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_a_ca_file_that_is_not_pem_is_named(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate")
    security = KafkaSecurity.from_env({**SASL, "SWITCHYARD_KAFKA_SSL_CAFILE": str(path)})

    with pytest.raises(ConfigError, match=f"SWITCHYARD_KAFKA_SSL_CAFILE={path}") as raised:
        kafka.security_options(security)
    assert PASSWORD not in str(raised.value)


# A throwaway EC key under a pass phrase, made for this test and used nowhere.
ENCRYPTED_KEY = """-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAivStADRSChzQICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEM6yib+HiIORCaL6aVeD1QIEgZBS
nwFiGSs9cZjJ3goUTlTmRVJNpg+T6EeWGs2/at+CC//wv70OecM6tifGcsnvTJ3S
veCJo9jS2xHp4Y/CJNCa8R8vYQWpVbaBxjoyDBxiLFQeJ5cM65xiwdZ7f8TMf0L1
3B9QmWuurfTPyQCEdVaDxc9CGXi3PAAj8ZEI+RsYpX+yHpfP9H9Dkv06pH6Gud0=
-----END ENCRYPTED PRIVATE KEY-----
"""


def test_an_encrypted_client_key_is_refused_instead_of_asking_for_its_pass_phrase(tmp_path):
    key = tmp_path / "client.key"
    key.write_text(ENCRYPTED_KEY)
    security = KafkaSecurity.from_env({"SWITCHYARD_KAFKA_SECURITY_PROTOCOL": "SSL",
                                       "SWITCHYARD_KAFKA_SSL_CERTFILE": certifi.where(),
                                       "SWITCHYARD_KAFKA_SSL_KEYFILE": str(key)})

    with pytest.raises(ConfigError, match="SWITCHYARD_KAFKA_SSL_KEYFILE is encrypted"):
        kafka.security_options(security)


class FakeBroker:
    """Listens like a broker, keeps the first bytes of each connection and hangs up: enough to see
    whether a client opened with TLS."""

    def __init__(self):
        self.first_bytes: list[bytes] = []

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._take, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            self.first_bytes.append(await asyncio.wait_for(reader.read(2), 5))
        writer.close()


async def _start_producer(bootstrap: str) -> None:
    client = kafka.producer(bootstrap, request_timeout_ms=2000)
    try:
        await client.start()
    finally:
        await client.stop()


async def _start_consumer(bootstrap: str) -> None:
    client = kafka.consumer(bootstrap, "t", group_id="g", request_timeout_ms=2000)
    try:
        await client.start()
    finally:
        await client.stop()


async def _fleet_views(bootstrap: str) -> None:
    with contextlib.suppress(Exception):
        async with fleet._admin(bootstrap):
            pass
    async with fleet._reader(bootstrap):
        pass


CLIENTS = {
    "producer": _start_producer,
    "consumer": _start_consumer,
    "wait_for_broker": lambda bootstrap: kafka.wait_for_broker(bootstrap, timeout_s=0.3),
    "ensure_topics": lambda bootstrap: kafka.ensure_topics(bootstrap, [TopicSpec("t", 1)]),
    "fleet admin and reader": _fleet_views,
}


@pytest.fixture
def process_security(monkeypatch):
    """Set SWITCHYARD_KAFKA_* for this process, as a deployment would, and read them afresh."""

    def set_env(env: dict[str, str]) -> None:
        for name in [name for name in os.environ if name.startswith("SWITCHYARD_KAFKA_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        kafka.security.cache_clear()

    yield set_env
    monkeypatch.undo()
    kafka.security.cache_clear()


@pytest.mark.parametrize("client", CLIENTS)
async def test_every_kafka_client_speaks_tls_when_the_process_is_told_to(process_security, client):
    process_security({**SASL, "SWITCHYARD_KAFKA_SSL_CAFILE": certifi.where()})
    broker = FakeBroker()
    async with broker as bootstrap:
        with pytest.raises((KafkaConnectionError, DependencyUnavailable)) as raised:
            await CLIENTS[client](bootstrap)

    assert broker.first_bytes and all(first == TLS_RECORD for first in broker.first_bytes)
    assert PASSWORD not in str(raised.value)


@pytest.mark.parametrize("client", CLIENTS)
async def test_by_default_every_kafka_client_speaks_plaintext(process_security, client):
    process_security({})
    broker = FakeBroker()
    async with broker as bootstrap:
        with pytest.raises((KafkaConnectionError, DependencyUnavailable)):
            await CLIENTS[client](bootstrap)

    # A Kafka request opens with its 4-byte length, far below a TLS record's first bytes.
    assert broker.first_bytes and all(first == b"\x00\x00" for first in broker.first_bytes)


# ------------------------------------------------------------------------- URLs and DSNs shown
@pytest.mark.parametrize("url, shown", [
    ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
    ("redis://:requirepass-pw@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("rediss://default:p%40ss@cache.internal:6380", "rediss://default:***@cache.internal:6380"),
    ("redis://:a/b@c@host:6379/0", "redis://:***@host:6379/0"),
    ("unix:///run/redis.sock?db=0&password=pw", "unix:///run/redis.sock?db=0&password=***"),
    ("http://switchyard:pw@clickhouse:8123", "http://switchyard:***@clickhouse:8123"),
    ("https://default@ch.internal:8443", "https://default@ch.internal:8443"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("chdb:///var/lib/switchyard/chdb", "chdb:///var/lib/switchyard/chdb"),
    (None, None),
])
def test_passwords_in_urls_are_masked_and_the_rest_is_kept(url, shown):
    assert masked(url) == shown


def test_an_error_quoting_a_dsn_or_its_password_is_scrubbed():
    dsn = "http://switchyard:p%40ss@clickhouse:8123"
    error = f"cannot connect to {dsn}: user switchyard, password p@ss, sent p%40ss"

    assert scrubbed(error, dsn) == ("cannot connect to http://switchyard:***@clickhouse:8123: "
                                    "user switchyard, password ***, sent ***")


@pytest.mark.parametrize("name, value", [
    ("SWITCHYARD_REDIS_URL", f"user:{PASSWORD}@redis:6379"),
    ("SWITCHYARD_CLICKHOUSE_DSN", f"https://switchyard:{PASSWORD}@ch.internal"),
])
def test_a_refused_url_is_quoted_masked(name, value):
    with pytest.raises(ConfigError, match=name) as raised:
        Settings.from_env({name: value})

    assert PASSWORD not in str(raised.value) and "***" in str(raised.value)


@pytest.mark.parametrize("scheme, opens_with_tls", [("https", True), ("http", False)])
def test_an_https_clickhouse_dsn_sends_its_password_over_tls_whatever_the_port(scheme, opens_with_tls):
    first_bytes: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def take() -> None:
            with contextlib.suppress(OSError):
                while True:
                    connection, _ = listener.accept()
                    with connection:
                        connection.settimeout(5)
                        first_bytes.append(connection.recv(2))

        threading.Thread(target=take, daemon=True).start()
        dsn = f"{scheme}://switchyard:{PASSWORD}@127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(DependencyUnavailable) as raised:
            CostStore.connect(dsn)

    assert first_bytes and all((first == TLS_RECORD) == opens_with_tls for first in first_bytes)
    assert PASSWORD not in str(raised.value) and "switchyard:***@127.0.0.1" in str(raised.value)


async def test_a_redis_url_broken_by_its_password_is_refused_without_a_piece_of_it():
    # An unencoded '/' ends the host part early: redis-py's own error would quote the password's first half.
    with pytest.raises(ConfigError, match="SWITCHYARD_REDIS_URL redis://:\\*\\*\\*@cache:6379/0") as raised:
        await connect("redis://:half/other-half@cache:6379/0")

    assert "half" not in str(raised.value)


# ------------------------------------------------------------------------------ provider keys
class EchoingProvider(BaseHTTPRequestHandler):
    """A provider at its worst: it quotes the credentials it was sent in every kind of failure."""

    sent: list[dict[str, str]] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = orjson.loads(self.rfile.read(int(self.headers["content-length"])))
        EchoingProvider.sent.append(dict(self.headers.items()))
        echo = self.headers.get("authorization") or self.headers.get("x-api-key")
        failure = body["model"]
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"data: " + orjson.dumps({"error": {"message": f"stream died, key {echo}"}}) + b"\n\n")
            return
        status, data = {
            "denied": (401, orjson.dumps({"error": {"message": f"Incorrect API key provided: {echo}"}})),
            "broken": (502, f"<html>bad gateway for {echo}</html>".encode()),
            "garbled": (200, f"not json, but {echo}".encode()),
            "code-only": (500, orjson.dumps({"error": {"code": 500, "echo": echo}})),
        }[failure]
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def echoing_url() -> str:
    with serving(EchoingProvider) as url:
        yield url


def _logged(exc: BaseException) -> str:
    """What a log line with the error's traceback shows: its chain, as the traceback module walks it."""
    return repr(exc) + "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("failure, stream, error", [
    ("denied", False, ProviderRejected),
    ("broken", False, ProviderUnavailable),
    ("garbled", False, ProviderUnavailable),
    ("code-only", False, ProviderUnavailable),
    ("stream-error", True, ProviderUnavailable),
])
async def test_a_provider_quoting_the_key_back_never_gets_it_into_an_error(monkeypatch, echoing_url, api,
                                                                           failure, stream, error):
    # With the newline a key read from a secret file often has: it is sent, and scrubbed, without it.
    monkeypatch.setenv(KEY_ENV, KEY + "\n")
    EchoingProvider.sent.clear()
    backend = ProviderBackend(ProviderSpec(api=api, base_url=echoing_url, model=failure, api_key_env=KEY_ENV))
    request = InferenceRequest(tenant="acme", route="chat", reply_to="app", prompt="Hi")

    async def on_text(piece: str) -> None:
        pass

    try:
        with pytest.raises(error) as raised:
            await backend.run(request, request_id="r1", max_tokens=8, on_text=on_text if stream else None)
    finally:
        await backend.aclose()

    sent = EchoingProvider.sent[-1]
    assert KEY in (sent.get("Authorization", "") + sent.get("x-api-key", ""))
    assert "[key]" in str(raised.value)
    assert KEY not in _logged(raised.value)


@pytest.mark.parametrize("value", ["sk-two words", "sk-ctrl\x01char", "sk-caf\u00e9"])
def test_a_key_no_header_can_carry_is_refused_at_start_without_being_shown(monkeypatch, value):
    monkeypatch.setenv(KEY_ENV, value)

    with pytest.raises(ConfigError, match=KEY_ENV) as raised:
        ProviderBackend(ProviderSpec(api="openai", base_url="https://api.example/v1", model="m", api_key_env=KEY_ENV))
    assert value not in str(raised.value)


def test_credentials_in_a_provider_base_url_are_refused_without_being_shown():
    spec = ProviderSpec(api="openai", base_url=f"https://user:{KEY}@api.example/v1", model="m")

    with pytest.raises(ConfigError, match="provider.api_key_env") as raised:
        ProviderBackend(spec)
    assert KEY not in str(raised.value)
