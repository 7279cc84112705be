"""The base every wire message shares: strict fields and a schema version."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1

# Names of tenants, routes and models end up in topic names, metric labels and SQL
# group keys, so they are kept to a safe alphabet and a bounded length.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class WireModel(BaseModel):
    """A model that rejects unknown fields, so a typo in a producer is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(WireModel):
    """A top-level message on a topic: it names the schema version it was written against."""

    schema_version: Literal[1] = SCHEMA_VERSION
