"""Every topic name, partition count and key rule, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.request import Priority
from shared.errors import ConfigError

REQUEST_PARTITIONS = 6
MODEL_PARTITIONS = 6
REPLY_PARTITIONS = 3
COST_PARTITIONS = 6
DEAD_LETTER_PARTITIONS = 1
POLICY_PARTITIONS = 1
HEALTH_PARTITIONS = 1
ESCALATION_PARTITIONS = 1
BATCH_PARTITIONS = 1
SUITE_PARTITIONS = 1
SAMPLE_PARTITIONS = 6
SCORE_PARTITIONS = 3
SAMPLE_RETENTION_S = 6 * 3600
SCORE_RETENTION_S = 8 * 86400  # the evaluator rebuilds a week of daily baselines from it at start


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix, so several deployments can share a cluster."""

    prefix: str = "switchyard"

    def requests(self, priority: Priority | str) -> str:
        return f"{self.prefix}.requests.{Priority(priority).value}"

    @property
    def all_requests(self) -> list[str]:
        return [self.requests(p) for p in Priority]

    def model(self, name: str) -> str:
        return f"{self.prefix}.model.{name}"

    def replies(self, reply_to: str) -> str:
        return f"{self.prefix}.replies.{reply_to}"

    @property
    def costs(self) -> str:
        return f"{self.prefix}.costs"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}.dead-letter"

    @property
    def policies(self) -> str:
        return f"{self.prefix}.policies"

    @property
    def health(self) -> str:
        return f"{self.prefix}.health"

    @property
    def batches(self) -> str:
        return f"{self.prefix}.batches"

    @property
    def escalations(self) -> str:
        return f"{self.prefix}.escalations"

    @property
    def suites(self) -> str:
        return f"{self.prefix}.suites"

    @property
    def samples(self) -> str:
        return f"{self.prefix}.samples"

    @property
    def scores(self) -> str:
        return f"{self.prefix}.scores"

    def plan(self, models: list[str], partitions: Mapping[str, int] | None = None) -> list[TopicSpec]:
        """The topics a deployment serving `models` needs, with their partition counts: the
        defaults, or `partitions` by priority (interactive, standard, batch) or model name."""
        counts = dict(partitions or {})
        priorities = [p.value for p in Priority]
        for name, count in counts.items():
            if name not in priorities and name not in models:
                raise ConfigError(f"partitions for {name!r}: not a priority ({', '.join(priorities)}) "
                                  f"nor a model ({', '.join(models) or 'none'})")
            if name in priorities and name in models:
                raise ConfigError(f"partitions for {name!r}: ambiguous, it is a priority and a model")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ConfigError(f"partitions for {name!r} must be a positive integer, got {count!r}")
        return [
            *(TopicSpec(self.requests(p), counts.get(p.value, REQUEST_PARTITIONS)) for p in Priority),
            *(TopicSpec(self.model(m), counts.get(m, MODEL_PARTITIONS)) for m in models),
            TopicSpec(self.costs, COST_PARTITIONS),
            TopicSpec(self.dead_letter, DEAD_LETTER_PARTITIONS),
            # Compacted: the latest policy is kept for ever, older versions may go.
            TopicSpec(self.policies, POLICY_PARTITIONS, {"cleanup.policy": "compact"}),
            # Reports are only worth seconds: keep an hour, for looking back.
            TopicSpec(self.health, HEALTH_PARTITIONS, {"retention.ms": str(3600 * 1000)}),
            # Confidence checks, for retraining the router's classifier: 30 days of them.
            TopicSpec(self.escalations, ESCALATION_PARTITIONS, {"retention.ms": str(30 * 86400 * 1000)}),
            # Batch jobs' progress, one record per job id: compacted, so each job's latest stays.
            TopicSpec(self.batches, BATCH_PARTITIONS, {"cleanup.policy": "compact"}),
            # Eval suites, one record per tenant and route: compacted, like the policy.
            TopicSpec(self.suites, SUITE_PARTITIONS, {"cleanup.policy": "compact"}),
            # Sampled outputs hold content: kept only as long as the evaluator may lag.
            TopicSpec(self.samples, SAMPLE_PARTITIONS, {"retention.ms": str(SAMPLE_RETENTION_S * 1000)}),
            # Scores (numbers, no text), for the books and the evaluator's baselines.
            TopicSpec(self.scores, SCORE_PARTITIONS, {"retention.ms": str(SCORE_RETENTION_S * 1000)}),
        ]

    def reply_spec(self, reply_to: str) -> TopicSpec:
        return TopicSpec(self.replies(reply_to), REPLY_PARTITIONS)


# Key rules. Requests are keyed by route, so one route's requests keep their order; model
# topics by the prefix hash (shared.prefix), so a conversation lands where its KV blocks are;
# replies and cost records by request id, which spreads them evenly; the policy by one fixed
# key, so compaction keeps exactly the latest.
def request_key(route: str) -> bytes:
    return route.encode()


def reply_key(request_id: str) -> bytes:
    return request_id.encode()


cost_key = reply_key
sample_key = reply_key
score_key = reply_key


def suite_key(tenant: str, route: str) -> bytes:
    """One record per tenant and route on the compacted suites topic: a new version replaces the last."""
    return f"{tenant}/{route}".encode()

POLICY_KEY = b"policy"
