"""Settings from SWITCHYARD_* environment variables, validated once at start."""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote

from shared.errors import ConfigError
from shared.topics import Topics

# How long a fetch may wait at the broker for records (aiokafka's fetch_max_wait_ms). Short by
# default: Tansu answers a waiting fetch only at the end of the wait, not when a record arrives.
# Tansu on S3 needs longer: it lists a partition's objects within that time, and a listing cut
# short returns nothing, so a partition of many objects (or a slow store) is never read at all.
FETCH_MAX_WAIT_MS = 50

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "deploy" / "local" / "policy.yaml"
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = ("SSL", "SASL_SSL")
# What aiokafka speaks with a username and password; GSSAPI and OAUTHBEARER need more than these settings.
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
MASK = "***"


class Secret:
    """A credential that shows as '***' wherever it ends up (repr, str, f-strings, a settings object in
    a log line); `reveal()` hands the value to the one client that must send it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class KafkaSecurity:
    """How every Kafka client of the process authenticates and encrypts (SWITCHYARD_KAFKA_*); the
    default, PLAINTEXT, is what the embedded broker speaks."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @property
    def sasl(self) -> bool:
        return self.protocol in SASL_PROTOCOLS

    @property
    def tls(self) -> bool:
        return self.protocol in TLS_PROTOCOLS

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> KafkaSecurity:
        get = _getter(env)
        protocol = (get("SWITCHYARD_KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper()
        if protocol not in KAFKA_PROTOCOLS:
            raise ConfigError(f"SWITCHYARD_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(KAFKA_PROTOCOLS)}, "
                              f"got {get('SWITCHYARD_KAFKA_SECURITY_PROTOCOL')!r}")
        mechanism, username, password = _sasl(get, protocol)
        cafile, certfile, keyfile = (_tls_file(get, name, protocol) for name in (
            "SWITCHYARD_KAFKA_SSL_CAFILE", "SWITCHYARD_KAFKA_SSL_CERTFILE", "SWITCHYARD_KAFKA_SSL_KEYFILE"))
        if keyfile and not certfile:
            raise ConfigError("SWITCHYARD_KAFKA_SSL_KEYFILE needs SWITCHYARD_KAFKA_SSL_CERTFILE, "
                              "the client certificate the key belongs to")
        return cls(protocol=protocol, sasl_mechanism=mechanism, sasl_username=username, sasl_password=password,
                   ssl_cafile=cafile, ssl_certfile=certfile, ssl_keyfile=keyfile)


@dataclass(frozen=True)
class Settings:
    """Where the broker, Redis and ClickHouse are; None means the local stack starts its own."""

    bootstrap: str | None = None
    redis_url: str | None = None
    clickhouse_dsn: str | None = None
    cost_ttl_days: int | None = None
    data_dir: Path = field(default_factory=lambda: Path(".switchyard").resolve())
    policy_file: Path = DEFAULT_POLICY
    topic_prefix: str = "switchyard"
    replication_factor: int = 1
    classifier: Path | None = None
    embeddings: bool = True
    metrics_port: int | None = None
    status_port: int | None = None
    gateway_port: int = 8080
    gateway_keys: Path | None = None
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    kafka_fetch_wait_ms: int = FETCH_MAX_WAIT_MS

    def __repr__(self) -> str:
        # The Redis URL and the ClickHouse DSN may carry passwords; a settings object in a log line must not.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["redis_url"], shown["clickhouse_dsn"] = masked(self.redis_url), masked(self.clickhouse_dsn)
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def classifier_path(self) -> Path:
        """The router's learned classifier: SWITCHYARD_CLASSIFIER, or the one `router train` writes by default."""
        return self.classifier or self.data_dir / "classifier.json"

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def chdb_path(self) -> Path:
        return self.data_dir / "chdb"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def dsn(self) -> str:
        """The ClickHouse DSN in force: the configured one, or chDB under the data folder."""
        return self.clickhouse_dsn or f"chdb://{self.chdb_path}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        get = _getter(env)
        replication = get("SWITCHYARD_REPLICATION_FACTOR") or "1"
        if not replication.isdigit() or int(replication) < 1:
            raise ConfigError(f"SWITCHYARD_REPLICATION_FACTOR must be a positive integer, got {replication!r}")
        dsn = get("SWITCHYARD_CLICKHOUSE_DSN")
        # clickhouse-connect speaks HTTP and takes the port from the DSN, not from its scheme.
        if dsn and not (dsn.startswith("chdb:///") or re.match(r"^https?://[^/]+:\d+(/.*)?$", dsn)):
            raise ConfigError("SWITCHYARD_CLICKHOUSE_DSN must be chdb:///abs/path or http(s)://[user:password@]host:port, "
                              f"got {masked(dsn)!r}")
        redis_url = get("SWITCHYARD_REDIS_URL")
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("SWITCHYARD_REDIS_URL must start with redis://, rediss:// or unix://, "
                              f"got {masked(redis_url)!r}")
        policy = Path(get("SWITCHYARD_POLICY") or DEFAULT_POLICY)
        embeddings = (get("SWITCHYARD_EMBEDDINGS") or "on").lower()
        if embeddings not in ("on", "off"):
            raise ConfigError(f"SWITCHYARD_EMBEDDINGS must be on or off, got {embeddings!r}")
        ttl_days = get("SWITCHYARD_COST_TTL_DAYS")
        if ttl_days is not None and not (ttl_days.isdigit() and int(ttl_days) > 0):
            raise ConfigError(f"SWITCHYARD_COST_TTL_DAYS must be a positive number of days, got {ttl_days!r}")
        metrics_port = _port(get("SWITCHYARD_METRICS_PORT"), "SWITCHYARD_METRICS_PORT")
        status_port = _port(get("SWITCHYARD_STATUS_PORT"), "SWITCHYARD_STATUS_PORT")
        gateway_port = _port(get("SWITCHYARD_GATEWAY_PORT"), "SWITCHYARD_GATEWAY_PORT") or 8080
        gateway_keys = get("SWITCHYARD_GATEWAY_KEYS")
        return cls(
            bootstrap=get("SWITCHYARD_BOOTSTRAP"),
            redis_url=redis_url,
            clickhouse_dsn=dsn,
            cost_ttl_days=int(ttl_days) if ttl_days else None,
            data_dir=Path(get("SWITCHYARD_DATA_DIR") or ".switchyard").resolve(),
            policy_file=policy,
            topic_prefix=get("SWITCHYARD_TOPIC_PREFIX") or "switchyard",
            replication_factor=int(replication),
            classifier=Path(get("SWITCHYARD_CLASSIFIER")).resolve() if get("SWITCHYARD_CLASSIFIER") else None,
            embeddings=embeddings == "on",
            metrics_port=metrics_port,
            status_port=status_port,
            gateway_port=gateway_port,
            gateway_keys=Path(gateway_keys).resolve() if gateway_keys else None,
            kafka_security=KafkaSecurity.from_env(env),
            kafka_fetch_wait_ms=kafka_fetch_wait_ms(env),
        )


def kafka_fetch_wait_ms(env: Mapping[str, str] = os.environ) -> int:
    """SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS, milliseconds from 1 to 30000 (default FETCH_MAX_WAIT_MS)."""
    value = _getter(env)("SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS")
    if value is None:
        return FETCH_MAX_WAIT_MS
    if not (value.isdigit() and 1 <= int(value) <= 30_000):
        raise ConfigError(f"SWITCHYARD_KAFKA_FETCH_MAX_WAIT_MS must be milliseconds from 1 to 30000, got {value!r}")
    return int(value)


def _port(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not (value.isdigit() and 0 < int(value) < 65536):
        raise ConfigError(f"{name} must be a port number, got {value!r}")
    return int(value)


def masked(url: str | None) -> str | None:
    """`url` with its password shown as '***' (user:PASSWORD@ and ?password=), for logs and errors:
    masked('redis://user:pw@host:6379/0') == 'redis://user:***@host:6379/0'."""
    if not url:
        return url
    before, userinfo, after = _split_userinfo(url)
    if userinfo is not None and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        if password:
            url = f"{before}{user}:{MASK}@{after}"
    return re.sub(r"([?&]password=)[^&#]*", rf"\g<1>{MASK}", url, flags=re.I)


def scrubbed(text: str, url: str | None) -> str:
    """`text` (an error from a client of `url`) with the URL masked and its password replaced
    wherever else it appears, raw or URL-encoded."""
    if not url:
        return text
    text = text.replace(url, masked(url))
    _, userinfo, _ = _split_userinfo(url)
    password = userinfo.partition(":")[2] if userinfo else ""
    for form in {password, unquote(password)} - {""}:
        text = text.replace(form, MASK)
    return text


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """(scheme:// part, user:password or None, host and the rest). The userinfo ends at the last '@'
    before any query, so that a password holding an unencoded '/' is still found whole."""
    scheme, sep, rest = url.partition("://")
    before = scheme + sep if sep else ""
    rest = rest if sep else url
    at = rest.rfind("@", 0, min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest)))
    if at < 0:
        return before, None, rest
    return before, rest[:at], rest[at + 1:]


def _getter(env: Mapping[str, str]) -> Callable[[str], str | None]:
    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    return get


def _sasl(get: Callable[[str], str | None], protocol: str) -> tuple[str | None, str | None, Secret | None]:
    """(mechanism, username, password): all three under a SASL protocol, none under the others."""
    named = {name: get(name) for name in ("SWITCHYARD_KAFKA_SASL_MECHANISM", "SWITCHYARD_KAFKA_SASL_USERNAME",
                                          "SWITCHYARD_KAFKA_SASL_PASSWORD", "SWITCHYARD_KAFKA_SASL_PASSWORD_FILE")}
    if protocol not in SASL_PROTOCOLS:
        # Credentials that would silently not be sent are a mistake to say out loud.
        for name, value in named.items():
            if value is not None:
                raise ConfigError(f"{name} is set but SWITCHYARD_KAFKA_SECURITY_PROTOCOL is {protocol}: "
                                  "SASL credentials are sent only with SASL_SSL or SASL_PLAINTEXT")
        return None, None, None
    mechanism = (named["SWITCHYARD_KAFKA_SASL_MECHANISM"] or "").upper() or None
    username = named["SWITCHYARD_KAFKA_SASL_USERNAME"]
    password = _password(named["SWITCHYARD_KAFKA_SASL_PASSWORD"], named["SWITCHYARD_KAFKA_SASL_PASSWORD_FILE"])
    missing = [name for name, value in (("SWITCHYARD_KAFKA_SASL_MECHANISM", mechanism),
                                        ("SWITCHYARD_KAFKA_SASL_USERNAME", username),
                                        ("SWITCHYARD_KAFKA_SASL_PASSWORD (or SWITCHYARD_KAFKA_SASL_PASSWORD_FILE)",
                                         password)) if value is None]
    if missing:
        raise ConfigError(f"SWITCHYARD_KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)}")
    if mechanism not in SASL_MECHANISMS:
        raise ConfigError(f"SWITCHYARD_KAFKA_SASL_MECHANISM must be one of {', '.join(SASL_MECHANISMS)}, "
                          f"got {named['SWITCHYARD_KAFKA_SASL_MECHANISM']!r}")
    return mechanism, username, password


def _tls_file(get: Callable[[str], str | None], name: str, protocol: str) -> Path | None:
    """The PEM file `name` points to: only under a TLS protocol, and it must be there at start."""
    value = get(name)
    if value is None:
        return None
    if protocol not in TLS_PROTOCOLS:
        raise ConfigError(f"{name} is set but SWITCHYARD_KAFKA_SECURITY_PROTOCOL is {protocol}: "
                          "TLS files are used only with SSL or SASL_SSL")
    if not Path(value).is_file():
        raise ConfigError(f"{name} names {value}, which is not a file")
    return Path(value).resolve()


def _password(value: str | None, file: str | None) -> Secret | None:
    """SWITCHYARD_KAFKA_SASL_PASSWORD, or what the file SWITCHYARD_KAFKA_SASL_PASSWORD_FILE names holds (a
    mounted Kubernetes or Docker secret). Errors name the variable and the file, never the value."""
    if value is not None and file is not None:
        raise ConfigError("set SWITCHYARD_KAFKA_SASL_PASSWORD or SWITCHYARD_KAFKA_SASL_PASSWORD_FILE, not both")
    if file is not None:
        try:
            # Secret files usually end in a newline that is not part of the password.
            value = Path(file).read_text().rstrip("\r\n") or None
        except OSError as exc:
            raise ConfigError(f"SWITCHYARD_KAFKA_SASL_PASSWORD_FILE names {file}, which cannot be read "
                              f"({exc.strerror})") from None
        if value is None:
            raise ConfigError(f"SWITCHYARD_KAFKA_SASL_PASSWORD_FILE names {file}, which is empty")
    return Secret(value) if value is not None else None
