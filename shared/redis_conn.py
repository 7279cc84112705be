"""Opening the Redis that SWITCHYARD_REDIS_URL names: one PING at start, so that refused credentials
stop the process with a message that says so, and a log line that says where, password masked."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis import exceptions as redis_errors

from shared.errors import ConfigError, DependencyUnavailable
from shared.settings import masked, scrubbed

log = logging.getLogger(__name__)


async def connect(url: str, *, required: bool = True, timeout_s: float = 2.0) -> Redis:
    """A client for `url` that has answered a PING. Refused credentials raise ConfigError: another try
    would be refused the same way. No answer raises DependencyUnavailable; when not `required`, it is
    logged and the client returned, to connect by itself once Redis is back."""
    where = masked(url)
    try:
        redis = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except ValueError:
        # redis-py's reason may quote a piece of a password that broke the URL apart: it is not repeated.
        raise ConfigError(f"SWITCHYARD_REDIS_URL {where} is not a URL redis-py can read: check it, and "
                          "percent-encode any of :/@?# in the user name or password") from None
    try:
        await redis.ping()
    # AuthenticationError is a ConnectionError: it has to be caught first.
    except redis_errors.AuthenticationError as exc:
        await redis.aclose()
        raise ConfigError(f"Redis at {where} refused the credentials of SWITCHYARD_REDIS_URL "
                          f"({scrubbed(str(exc), url)}); give them as redis://user:password@host:port/db, "
                          "or redis://:password@host:port/db for a requirepass server") from None
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        reason = scrubbed(str(exc), url)
        if required:
            await redis.aclose()
            raise DependencyUnavailable(f"no Redis answered at {where} within {timeout_s:g} s ({reason}); "
                                        "check SWITCHYARD_REDIS_URL") from None
        log.warning("Redis at %s does not answer (%s); going on without it until it does", where, reason)
        return redis
    log.info("Redis at %s", where)
    return redis
