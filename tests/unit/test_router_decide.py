"""The router's decision for one request: model, capped max_tokens, and refusals that say why."""

import pytest

from schemas import InferenceRequest
from services.router.policy import parse
from services.router.decide import NoCapableModel, decide
from shared.errors import InputTooLarge
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


def req(route="chat", max_tokens=256, prompt="hi", **fields) -> InferenceRequest:
    return InferenceRequest(tenant="acme", route=route, reply_to="svc", prompt=prompt,
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


RICH = parse("""
version: "v10"
models:
  mini: {tier: small, price_in_usd_per_mtok: 0.1, price_out_usd_per_mtok: 0.4, max_context_tokens: 100}
  small: {tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.6, supports_json_schema: true}
  large: {tier: large, price_in_usd_per_mtok: 2.5, price_out_usd_per_mtok: 10, supports_tools: true,
          supports_json_schema: true}
routes:
  chat: {models: [large, small, mini], max_output_tokens: 32, max_input_tokens: 1000}
  capped: {models: [small, large], max_output_tokens: 100, max_cost_usd: 0.0002}
""")


def test_the_cheapest_capable_model_wins_and_the_rest_are_the_fallback_chain_cheapest_first():
    routed = decide(req(), RICH)
    assert routed.model == "mini"
    assert [h.model for h in routed.fallbacks] == ["small", "large"]
    assert routed.reasons[-1].startswith("cheapest capable model")


def test_a_harder_request_skips_lower_tiers():
    routed = decide(req(), RICH, hard=True, reasons=["classifier: hard"])
    assert routed.model == "large" and routed.fallbacks == [] and routed.tier == "large"
    assert routed.reasons[0] == "classifier: hard"


def test_a_hard_request_on_a_route_without_the_hard_tier_gets_the_routes_strongest_and_says_so():
    only_small = parse("""
models:
  small: {tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.6}
  large: {tier: large, price_in_usd_per_mtok: 2.5, price_out_usd_per_mtok: 10}
routes:
  cheap: {models: [small], max_output_tokens: 8}
""")
    routed = decide(req(route="cheap"), only_small, hard=True)
    assert routed.model == "small" and routed.tier == "small"
    assert "the route's strongest tier is small" in routed.reasons[0]


def test_the_hard_tier_is_configurable_and_must_be_a_tier():
    three = """
tiers: [small, large, frontier]
hard_tier: %s
models:
  small: {tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.6}
  large: {tier: large, price_in_usd_per_mtok: 2.5, price_out_usd_per_mtok: 10}
  top: {tier: frontier, price_in_usd_per_mtok: 15, price_out_usd_per_mtok: 75}
routes:
  all: {models: [small, large, top], max_output_tokens: 8, allow_escalation: true}
"""
    assert decide(req(route="all"), parse(three % "large"), hard=True).model == "large"
    assert decide(req(route="all"), parse(three % "frontier"), hard=True).model == "top"
    assert decide(req(route="all", escalate=True), parse(three % "large")).model == "top"
    with pytest.raises(Exception, match="hard_tier"):
        parse(three % "huge")


def test_capabilities_decide_which_models_can_serve():
    long_prompt = req(prompt="word " * 200)  # ~250 tokens: over mini's 100-token context
    assert decide(long_prompt, RICH).model == "small"
    assert decide(req(response_schema={"type": "object"}), RICH).model == "small"
    assert decide(req(tools=[{"type": "function", "function": {"name": "f"}}]), RICH).model == "large"


def test_unhealthy_models_are_skipped_not_retried():
    assert decide(req(), RICH, unhealthy={"mini"}).model == "small"


def test_over_the_input_limit_is_input_too_large():
    with pytest.raises(InputTooLarge, match="at most 1000"):
        decide(req(prompt="x" * 8000), RICH)


def test_cost_ceilings_of_route_and_request_skip_dear_models():
    # small worst case: 1 token in * 150 + 100 out * 600 = 60,150 nano-USD; large: 1,002,500 > 200,000.
    assert decide(req(route="capped", max_tokens=100), RICH).fallbacks == []
    with pytest.raises(NoCapableModel, match="over the ceiling"):
        decide(req(route="capped", max_tokens=100, max_cost_nano_usd=1000), RICH)


def test_tiers_must_be_known():
    with pytest.raises(Exception, match="models.x.tier: 'huge' is not one of the tiers"):
        parse(GOOD_TIERLESS)


GOOD_TIERLESS = """
models:
  x: {tier: huge, price_in_usd_per_mtok: 1, price_out_usd_per_mtok: 1}
routes:
  r: {models: [x], max_output_tokens: 1}
"""
