"""Eval suites as every service sees them: read from a YAML file, found for a tenant and route, and
the rule that picks which answers are sampled."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import ValidationError

from schemas.quality import ANY_TENANT, EvalSuite, SuiteFile
from shared.codec import describe
from shared.errors import ConfigError
from shared.topics import suite_key

# The evaluator's own judge calls: never sampled, or a judge route with a suite would judge itself.
EVALUATOR_REPLY_TO = "switchyard-evaluator"


def load(path: Path) -> SuiteFile:
    """The suites of a YAML file (a `suites:` list), validated whole; ConfigError naming what is wrong."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read eval suites from {path}: {exc}") from None
    try:
        return SuiteFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"eval suites in {path} are invalid: {describe(exc)}") from None


def picked(request_id: str, rate: float) -> bool:
    """Whether `request_id` falls in a sample of share `rate`: the same answer for the same id, everywhere."""
    if rate <= 0:
        return False
    draw = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big") / 2**64
    return draw < rate


def suite_for(suites: dict[bytes, EvalSuite], tenant: str, route: str) -> EvalSuite | None:
    """The tenant's own suite for the route, else the route's suite for every tenant."""
    return suites.get(suite_key(tenant, route)) or suites.get(suite_key(ANY_TENANT, route))
