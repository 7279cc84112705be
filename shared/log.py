"""Readable one-line logs: time, service, level, message."""

from __future__ import annotations

import logging
import os
import sys


def setup(service: str, level: str | None = None) -> None:
    level = (level or os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {service:<10} %(levelname)-5s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every rebalance step at INFO; only its warnings matter to a reader.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # httpx logs every request at INFO (the status page scrapes every few seconds).
    logging.getLogger("httpx").setLevel(logging.WARNING)
