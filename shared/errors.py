"""One error tree for every service: each error says whether to retry and whose fault it is."""

from __future__ import annotations


class SwitchyardError(Exception):
    """Root of every error Switchyard raises."""

    code = "internal"
    retriable = False
    # True when the process cannot go on (its engine died): stop, commit nothing more, let
    # the supervisor restart it and Kafka redeliver what it had not finished.
    fatal = False
    # True when the caller sent something wrong: dead-letter it and answer with an error,
    # never retry. False: the platform failed, retry (if retriable) and alert.
    caller_fault = False
    # True when another model of the route's chain may well serve the request: the worker
    # hands it to the next fallback instead of answering with this error.
    moves_on = False


class InputError(SwitchyardError):
    """A message or request is malformed or breaks its route's rules."""

    code = "input_invalid"
    caller_fault = True


class UndecodableMessage(InputError):
    """A message on a topic is not JSON, or not the contract it should be."""

    code = "undecodable"


class UnknownRoute(InputError):
    """The request names a route no policy covers, and unknown routes are rejected."""

    code = "unknown_route"


class EscalationNotAllowed(InputError):
    """The request asks for the frontier tier on a route that does not permit it."""

    code = "escalation_not_allowed"


class InputTooLarge(InputError):
    """The input is over the route's max_input_tokens or the model's context."""

    code = "input_too_large"


class ConfigError(SwitchyardError):
    """A setting or configuration file is wrong; the message names it."""

    code = "config_invalid"


class PolicyError(ConfigError):
    """A policy file is invalid; it is refused whole."""

    code = "policy_invalid"


class EngineError(SwitchyardError):
    """The model engine failed on one request; the engine itself is still serving."""

    code = "engine_error"
    retriable = True


class EngineDead(SwitchyardError):
    """The model engine itself has died; nothing more can run in this process."""

    code = "engine_dead"
    fatal = True


class ProviderUnavailable(SwitchyardError):
    """An external model API refused or failed the call (429, 5xx, timeout, connection): the
    request moves on to the next model of its chain rather than retrying the same endpoint."""

    code = "provider_unavailable"
    retriable = True
    moves_on = True

    def __init__(self, message: str, *, code: str | None = None, retry_after_ms: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.retry_after_ms = retry_after_ms


class ProviderRejected(SwitchyardError):
    """An external model API refused the request itself (4xx other than 429): its fault is in the
    request or the configuration, so another try would fail the same way."""

    code = "provider_rejected"


class DependencyUnavailable(SwitchyardError):
    """A broker, Redis or ClickHouse could not be reached in time."""

    code = "dependency_unavailable"
    retriable = True


class RequestTimeout(SwitchyardError):
    """No result arrived for a request within the client's timeout."""

    code = "timeout"
    retriable = True
