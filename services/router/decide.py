"""Choosing the model for one request: the cheapest one of the route's models that can serve it.

A model can serve a request when its tier is at least the one the request needs (the route's
lowest by default, the strongest for `escalate: true`, higher when the classifier says the
request is hard), it has the capabilities the request uses (context length, tools, a JSON
schema), its worst-case cost is under the ceilings, and it is healthy. The rest of the
candidates, cheapest first, travel with the request as its fallback chain.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from schemas import Hop, InferenceRequest, ModelPrice, PolicySet, RoutedRequest, RoutePolicy, now_ms
from shared.codec import replaced
from shared.prefix import prefix_hash
from shared.errors import EscalationNotAllowed, InputError, InputTooLarge, UnknownRoute

NANO_USD_PER_USD = 10**9
# Without the model's tokenizer the router estimates: about 4 bytes of text per token, plus a
# few tokens of chat template per message. The worker counts exactly and bills what it counts.
BYTES_PER_TOKEN = 4
TEMPLATE_TOKENS_PER_MESSAGE = 4


class NoCapableModel(InputError):
    """No model of the route can serve this request (tier, context, tools, schema, cost ceiling or health)."""

    code = "no_capable_model"


def estimate_tokens(request: InferenceRequest) -> int:
    if request.messages is not None:
        return sum(len(m.content.encode()) // BYTES_PER_TOKEN + TEMPLATE_TOKENS_PER_MESSAGE for m in request.messages)
    return len(request.prompt.encode()) // BYTES_PER_TOKEN + 1


def _why(unhealthy, model: str) -> str:
    return unhealthy.get(model, "unhealthy") if isinstance(unhealthy, Mapping) else "unhealthy"


def admit(request: InferenceRequest, policies: PolicySet, tokens_in: int) -> RoutePolicy:
    """The policy that serves the request, or an InputError: unknown route, input too large,
    escalation the route does not allow."""
    policy = policies.route_for(request.route)
    if policy is None:
        raise UnknownRoute(f"no policy for route {request.route!r} (routes: {', '.join(policies.routes)})")
    if policy.max_input_tokens is not None and tokens_in > policy.max_input_tokens:
        raise InputTooLarge(f"the input is about {tokens_in} tokens; route {request.route!r} takes at most "
                            f"{policy.max_input_tokens}")
    if request.escalate and not policy.allow_escalation:
        raise EscalationNotAllowed(f"route {request.route!r} does not allow 'escalate: true'")
    return policy


@dataclass(frozen=True)
class Facts:
    """What every decision under one policy set looks up, worked out once per set: the router
    decides thousands of times a second under the same policy."""

    ranks: dict[str, int]
    prices: dict[str, ModelPrice]
    hops: dict[str, Hop]
    route_tiers: dict[int, frozenset[int]]  # id(RoutePolicy) -> the tier ranks of its models
    hard_rank: int

    @classmethod
    def of(cls, policies: PolicySet) -> Facts:
        ranks = {m: policies.tier_rank(m) for m in policies.models}
        prices = {m: spec.price for m, spec in policies.models.items()}
        return cls(
            ranks=ranks,
            prices=prices,
            hops={m: Hop(model=m, tier=spec.tier, rank=ranks[m], price=prices[m]) for m, spec in policies.models.items()},
            route_tiers={id(p): frozenset(ranks[m] for m in p.models) for p in policies.routes.values()},
            hard_rank=policies.hard_rank,
        )


_FACTS: dict[int, tuple[PolicySet, Facts]] = {}


def facts(policies: PolicySet) -> Facts:
    """The Facts of `policies` (kept for the few policy sets seen last; a policy set is immutable)."""
    known = _FACTS.get(id(policies))
    if known is None or known[0] is not policies:
        if len(_FACTS) >= 8:
            _FACTS.clear()
        known = _FACTS[id(policies)] = (policies, Facts.of(policies))
    return known[1]


def tiers_of(policy: RoutePolicy, policies: PolicySet) -> frozenset[int]:
    tiers = facts(policies).route_tiers.get(id(policy))
    return tiers if tiers is not None else frozenset(policies.tier_rank(m) for m in policy.models)


def decide(request: InferenceRequest, policies: PolicySet, *, tokens_in: int | None = None, hard: bool = False,
           reasons: Collection[str] = (), unhealthy: Collection[str] | Mapping[str, str] = ()) -> RoutedRequest:
    """The routed request, or an InputError saying why no model may serve it. `hard`: the
    classifier judged it to need the policy's hard tier (or the route's strongest, if lower).
    `unhealthy`: models to skip (with why, as a mapping), unless nothing else can serve.
    `tokens_in` is the caller's estimate_tokens(request), when it has one already."""
    tokens_in = estimate_tokens(request) if tokens_in is None else tokens_in
    policy = admit(request, policies, tokens_in)
    known = facts(policies)
    max_tokens = min(request.sampling.max_tokens, policy.max_output_tokens)
    why = list(reasons)
    strongest = max(tiers_of(policy, policies))
    needs_tier = 0
    if request.escalate:
        needs_tier = strongest
        why.append("escalate requested")
    elif hard:
        needs_tier = min(known.hard_rank, strongest)
        if needs_tier < known.hard_rank:
            why.append(f"judged hard; the route's strongest tier is {policies.tiers[needs_tier]}")
    ceilings = [c for c in (policy.max_cost_usd and int(policy.max_cost_usd * NANO_USD_PER_USD),
                            request.max_cost_nano_usd) if c is not None]
    ceiling = min(ceilings) if ceilings else None

    candidates, skipped, sick = [], [], []
    for model in policy.models:
        spec = policies.models[model]
        worst_case = known.prices[model].cost_nano_usd(tokens_in, max_tokens)
        if known.ranks[model] < needs_tier:
            skipped.append(f"{model}: tier {spec.tier} is below {policies.tiers[needs_tier]}")
        elif tokens_in + 1 > spec.max_context_tokens:
            skipped.append(f"{model}: context {spec.max_context_tokens} tokens is too short")
        elif request.tools and not spec.supports_tools:
            skipped.append(f"{model}: no tool calls")
        elif request.response_schema and not spec.supports_json_schema:
            skipped.append(f"{model}: no JSON schema output")
        elif ceiling is not None and worst_case > ceiling:
            skipped.append(f"{model}: worst case {worst_case} nano-USD is over the ceiling {ceiling}")
        elif model in unhealthy:
            skipped.append(f"{model}: unhealthy")
            sick.append((worst_case, model))
            why.append(f"skipped {model}: {_why(unhealthy, model)}")
        else:
            candidates.append((worst_case, model))
    if not candidates and sick:
        # Every capable model is unhealthy: better slow than refused; the chain is not retried.
        candidates = sick
        why.append("every capable model is unhealthy: using them anyway")
    if not candidates:
        raise NoCapableModel(f"no model of route {request.route!r} can serve this request: {'; '.join(skipped)}")
    candidates.sort(key=lambda c: c[0])  # stable: equal prices keep the route's order
    chosen = candidates[0][1]
    why.append(f"cheapest capable model at tier {policies.models[chosen].tier} or above")
    if max_tokens != request.sampling.max_tokens:
        request = replaced(request, sampling=replaced(request.sampling, max_tokens=max_tokens))
    return RoutedRequest(
        request=request,
        model=chosen,
        tier=policies.models[chosen].tier,
        price=known.prices[chosen],
        policy_version=policies.version,
        received_at_ms=now_ms(),
        fallbacks=[known.hops[model] for _, model in candidates[1:]],
        rank=known.ranks[chosen],
        escalate_below=policy.escalate_below_confidence,
        prefix_hash=prefix_hash(request),
        reasons=why,
    )
