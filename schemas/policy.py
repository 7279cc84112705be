"""RoutePolicy and the set of them in force: which models a route may use and at what price."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Literal

from pydantic import Field, field_validator, model_validator

from schemas._base import NAME_PATTERN, Message, WireModel

NANO_USD_PER_USD_PER_MTOK = 1000  # $1 per 1M tokens is 1e-6 USD a token: 1000 nano-USD.


class ModelPrice(WireModel):
    """Prices of one model, exact in nano-USD per token."""

    in_nano_usd_per_token: int = Field(ge=0)
    out_nano_usd_per_token: int = Field(ge=0)

    def cost_nano_usd(self, tokens_in: int, tokens_out: int) -> int:
        return tokens_in * self.in_nano_usd_per_token + tokens_out * self.out_nano_usd_per_token


class ProviderSpec(WireModel):
    """An external model behind an HTTP API: a provider worker serves it instead of a vLLM engine."""

    api: Literal["openai", "anthropic"] = Field(description=(
        "openai: any OpenAI-compatible /v1/chat/completions; anthropic: the Messages API /v1/messages."))
    base_url: str = Field(min_length=1, max_length=512, description="Up to the version, e.g. https://host/v1.")
    model: str = Field(min_length=1, max_length=256, description="The provider's name for the model.")
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]{0,127}$", description=(
        "Environment variable holding the API key; keys never travel in messages or policies."))
    timeout_s: float = Field(default=60.0, gt=0, le=600, description="Per call; past it the request moves on down the chain.")


class ModelSpec(WireModel):
    tier: str = Field(pattern=NAME_PATTERN, description="One of the policy's tiers: what the model is good for.")
    price_in_usd_per_mtok: Decimal = Field(ge=0, description="USD per 1M prompt tokens, at most 3 decimals.")
    price_out_usd_per_mtok: Decimal = Field(ge=0, description="USD per 1M output tokens, at most 3 decimals.")
    max_context_tokens: int = Field(default=4096, ge=1)
    supports_tools: bool = False
    supports_json_schema: bool = False
    max_p95_latency_ms: int | None = Field(default=None, ge=1, description=(
        "Skip the model while its workers' rolling p95 latency is over this."))
    max_error_rate: float | None = Field(default=None, gt=0, le=1, description=(
        "Skip the model while this share of its recent requests fail (judged on 10 or more)."))
    max_backlog: int | None = Field(default=None, ge=0, description=(
        "Skip the model while every worker is full and more than this many requests wait for it."))
    spill_backlog: int = Field(default=8, ge=0, description=(
        "Prefix affinity gives way when the conversation's partition has more than this many requests "
        "waiting: the request goes to the partition with the least waiting instead."))
    provider: ProviderSpec | None = Field(default=None, description="Set for a model served by an external API.")

    @field_validator("price_in_usd_per_mtok", "price_out_usd_per_mtok")
    @classmethod
    def _exact(cls, price: Decimal) -> Decimal:
        # Money stays exact: a price must map to a whole number of nano-USD per token.
        if (price * NANO_USD_PER_USD_PER_MTOK) % 1 != 0:
            raise ValueError("prices may have at most 3 decimals (exact in nano-USD per token)")
        return price

    @property
    def price(self) -> ModelPrice:
        return ModelPrice(
            in_nano_usd_per_token=int(self.price_in_usd_per_mtok * NANO_USD_PER_USD_PER_MTOK),
            out_nano_usd_per_token=int(self.price_out_usd_per_mtok * NANO_USD_PER_USD_PER_MTOK),
        )


class TenantLimits(WireModel):
    """Per-minute limits of one tenant, shared by every router through Redis; None is unlimited."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class GuardrailPolicy(WireModel):
    """Inline checks on what a route's requests carry, before any model sees them (shared/guardrails.py)."""

    pii: Literal["off", "redact", "block"] = Field(default="off", description=(
        "Personal data in any message (emails, phone numbers, card numbers, US SSNs, IBANs, IPv4 "
        "addresses): 'redact' replaces each with a placeholder such as [EMAIL] before the request is "
        "forwarded; 'block' answers the request 'blocked'."))
    injection: Literal["off", "block"] = Field(default="off", description=(
        "'block' answers 'blocked' a request whose user or tool messages try to override the model's "
        "instructions, switch it into an unrestricted mode or extract its system prompt (rules on a "
        "normalised text that undoes homoglyphs, zero-width characters, leetspeak and spaced letters)."))
    injection_similarity: float | None = Field(default=None, gt=0, le=1, description=(
        "With injection 'block': also block a text whose all-MiniLM-L6-v2 embedding has this cosine or more "
        "to a known injection (services/router/data/injections.jsonl); a router without embeddings uses the "
        "rules alone. Off by default: measured on the bundled examples it adds next to nothing the rules "
        "miss (scripts/eval_injection), and it costs an embedding per screened text."))

    @model_validator(mode="after")
    def _similarity_needs_the_screen(self) -> GuardrailPolicy:
        if self.injection_similarity is not None and self.injection != "block":
            raise ValueError("injection_similarity needs injection: block")
        return self

    @property
    def active(self) -> bool:
        return self.pii != "off" or self.injection != "off"


class CachePolicy(WireModel):
    exact: bool = Field(default=False, description="Answer a request identical to an earlier one from its stored result.")
    semantic: bool = Field(default=False, description="Answer a request whose conversation is close enough in meaning.")
    semantic_threshold: float = Field(default=0.95, gt=0, le=1, description="Cosine similarity a semantic hit needs.")
    semantic_embedder: Literal["minilm", "static"] = Field(default="minilm", description=(
        "minilm: all-MiniLM-L6-v2, the better judge of meaning (milliseconds a request on a CPU); static: "
        "a table distilled from it, microseconds a request, blinder to wording (see docs/policy.md)."))
    shared: bool = Field(default=False, description="Share entries between tenants; off: each tenant has its own.")
    ttl_s: int = Field(default=3600, ge=1, description="How long an entry answers.")
    max_entries: int = Field(default=10_000, ge=1, description="Semantic entries per namespace; the oldest go first.")


class RoutePolicy(WireModel):
    models: list[str] = Field(min_length=1, description="Models the route may use; the fallback chain, in this order.")
    max_input_tokens: int | None = Field(default=None, ge=1, description="Over it (estimated): rejected input_too_large.")
    max_output_tokens: int = Field(ge=1, description="A request's max_tokens is capped to this.")
    allow_escalation: bool = Field(default=False, description="Whether 'escalate: true' may send a request to the route's strongest tier.")
    max_cost_usd: Decimal | None = Field(default=None, gt=0, description="Cost ceiling per request: models whose worst case is dearer are skipped.")
    cache: CachePolicy = Field(default_factory=CachePolicy, description="Off unless the route opts in.")
    guardrails: GuardrailPolicy = Field(default_factory=GuardrailPolicy, description="Off unless the route opts in.")
    escalate_below_confidence: float | None = Field(default=None, gt=0, lt=1, description=(
        "An answer whose confidence (the geometric mean of its tokens' probabilities) is below this goes "
        "on to the next stronger model of the route; off when unset."))
    idempotency_window_s: int = Field(default=600, ge=0, le=7 * 86400, description=(
        "A repeat (same idempotency_key, or same content from the same tenant) within this window gets the "
        "first result instead of running again; 0 turns it off."))


class PolicySet(Message):
    """Every route's policy and every model's price: what a router needs to decide."""

    version: str = Field(default="1", max_length=64)
    tiers: list[str] = Field(default_factory=lambda: ["small", "large", "frontier"], min_length=1,
                             description="Tiers from cheapest to strongest.")
    hard_tier: str | None = Field(default=None, description=(
        "The tier a request judged hard needs; by default the second cheapest tier."))
    unknown_route: Literal["reject"] | str = Field(
        default="reject", description="'reject', or the name of a route whose policy serves requests for unknown routes."
    )
    models: dict[str, ModelSpec] = Field(min_length=1)
    routes: dict[str, RoutePolicy] = Field(min_length=1)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict, description="Limits of named tenants.")
    default_tenant_limits: TenantLimits = Field(default_factory=TenantLimits, description="Limits of every other tenant.")

    @field_validator("models", "routes")
    @classmethod
    def _names(cls, named: dict) -> dict:
        for name in named:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a valid name (letters, digits, '_', '.', '-'; at most 64)")
        return named

    @model_validator(mode="after")
    def _references(self) -> PolicySet:
        problems = []
        for model, spec in self.models.items():
            if spec.tier not in self.tiers:
                problems.append(f"models.{model}.tier: {spec.tier!r} is not one of the tiers ({', '.join(self.tiers)})")
        for route, policy in self.routes.items():
            for model in policy.models:
                if model not in self.models:
                    problems.append(f"routes.{route}.models: unknown model {model!r} (known: {', '.join(self.models)})")
        if self.hard_tier is not None and self.hard_tier not in self.tiers:
            problems.append(f"hard_tier: {self.hard_tier!r} is not one of the tiers ({', '.join(self.tiers)})")
        if self.unknown_route != "reject" and self.unknown_route not in self.routes:
            problems.append(f"unknown_route: {self.unknown_route!r} is neither 'reject' nor a route")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def tier_rank(self, model: str) -> int:
        return self.tiers.index(self.models[model].tier)

    @property
    def hard_rank(self) -> int:
        return self.tiers.index(self.hard_tier) if self.hard_tier else min(1, len(self.tiers) - 1)

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, self.default_tenant_limits)

    def route_for(self, route: str) -> RoutePolicy | None:
        """The policy that serves `route`: its own, the default route's, or None (reject)."""
        if route in self.routes:
            return self.routes[route]
        if self.unknown_route != "reject":
            return self.routes[self.unknown_route]
        return None
