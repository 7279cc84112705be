"""Settings from SWITCHYARD_* environment variables, validated once at start."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError
from shared.topics import Topics

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "deploy" / "local" / "policy.yaml"


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
        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        replication = get("SWITCHYARD_REPLICATION_FACTOR") or "1"
        if not replication.isdigit() or int(replication) < 1:
            raise ConfigError(f"SWITCHYARD_REPLICATION_FACTOR must be a positive integer, got {replication!r}")
        dsn = get("SWITCHYARD_CLICKHOUSE_DSN")
        # clickhouse-connect speaks HTTP and takes the port from the DSN, not from its scheme.
        if dsn and not (dsn.startswith("chdb:///") or re.match(r"^https?://[^/]+:\d+(/.*)?$", dsn)):
            raise ConfigError("SWITCHYARD_CLICKHOUSE_DSN must be chdb:///abs/path or http(s)://[user:password@]host:port, "
                              f"got {dsn!r}")
        redis_url = get("SWITCHYARD_REDIS_URL")
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"SWITCHYARD_REDIS_URL must start with redis://, rediss:// or unix://, got {redis_url!r}")
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
        )


def _port(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not (value.isdigit() and 0 < int(value) < 65536):
        raise ConfigError(f"{name} must be a port number, got {value!r}")
    return int(value)
