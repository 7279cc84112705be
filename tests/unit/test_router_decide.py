"""The router's decision for one request: model, capped max_tokens, and refusals that say why."""

import pytest

from schemas import InferenceRequest
from services.router.policy import parse
from services.router.service import decide
from shared.errors import EscalationNotAllowed, UnknownRoute

POLICIES = parse("""
version: "v9"
models:
  small: {tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.6}
  large: {tier: large, price_in_usd_per_mtok: 2.5, price_out_usd_per_mtok: 10}
routes:
  chat: {models: [small, large], max_output_tokens: 32}
  deep: {models: [small, large], max_output_tokens: 64, allow_escalation: true}
""")


def req(route="chat", max_tokens=256, **fields) -> InferenceRequest:
    return InferenceRequest(tenant="acme", route=route, reply_to="svc", prompt="hi",
                            sampling={"max_tokens": max_tokens}, **fields)


def test_primary_model_with_its_price_and_the_policy_version():
    routed = decide(req(), POLICIES)
    assert routed.model == "small"
    assert routed.price.out_nano_usd_per_token == 600
    assert routed.policy_version == "v9"


def test_max_tokens_is_capped_to_the_route_and_never_raised():
    assert decide(req(max_tokens=500), POLICIES).request.sampling.max_tokens == 32
    assert decide(req(max_tokens=8), POLICIES).request.sampling.max_tokens == 8


def test_escalate_goes_to_the_last_model_only_where_allowed():
    assert decide(req(route="deep", escalate=True), POLICIES).model == "large"
    with pytest.raises(EscalationNotAllowed, match="chat"):
        decide(req(escalate=True), POLICIES)


def test_unknown_route_is_refused_with_the_known_routes():
    with pytest.raises(UnknownRoute, match="chat, deep"):
        decide(req(route="nope"), POLICIES)
