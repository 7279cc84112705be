"""The policy loader: a valid file loads; an invalid one is refused whole, naming route and field."""

from pathlib import Path

import pytest

from services.router.policy import load, parse
from shared.errors import PolicyError
from shared.settings import DEFAULT_POLICY

GOOD = """
version: "7"
models:
  small: {tier: small, price_in_usd_per_mtok: 0.15, price_out_usd_per_mtok: 0.6}
  large: {tier: large, price_in_usd_per_mtok: 2.5, price_out_usd_per_mtok: 10}
routes:
  chat: {models: [small, large], max_output_tokens: 32}
  deep: {models: [large], max_output_tokens: 64, allow_escalation: true}
"""


def test_the_shipped_local_policy_loads():
    policies = load(DEFAULT_POLICY)
    assert {"small", "large"} <= set(policies.models)
    assert set(policies.routes) >= {"chat", "reasoning"}


def test_valid_policy_gives_routes_models_and_exact_prices():
    policies = parse(GOOD)
    assert policies.version == "7"
    assert policies.routes["chat"].models == ["small", "large"]
    assert policies.models["large"].price.out_nano_usd_per_token == 10_000


def test_unknown_route_is_rejected_or_served_by_the_default_route():
    assert parse(GOOD).route_for("nope") is None
    with_default = parse(GOOD + "unknown_route: chat\n")
    assert with_default.route_for("nope") == with_default.routes["chat"]


def test_error_names_route_and_field():
    bad = GOOD.replace("max_output_tokens: 64", "max_output_tokens: -1")
    with pytest.raises(PolicyError, match=r"routes\.deep\.max_output_tokens"):
        parse(bad, "p.yaml")


def test_every_problem_is_reported_and_nothing_applied():
    bad = GOOD.replace("models: [large]", "models: [xl]").replace("price_in_usd_per_mtok: 0.15", "price_in_usd_per_mtok: -1")
    with pytest.raises(PolicyError) as err:
        parse(bad, "p.yaml")
    text = str(err.value)
    assert "nothing applied" in text
    assert "models.small.price_in_usd_per_mtok" in text


def test_reference_to_an_unknown_model_names_the_route():
    with pytest.raises(PolicyError, match=r"routes\.deep\.models: unknown model 'xl'"):
        parse(GOOD.replace("models: [large]", "models: [xl]"))


def test_unknown_field_is_refused():
    with pytest.raises(PolicyError, match=r"routes\.chat\.cache"):
        parse(GOOD.replace("max_output_tokens: 32}", "max_output_tokens: 32, cache: exact}"))


def test_not_yaml_and_missing_file_say_so(tmp_path: Path):
    with pytest.raises(PolicyError, match="not valid YAML"):
        parse("routes: [", "p.yaml")
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load(tmp_path / "missing.yaml")


def test_comparing_with_known_injections_needs_the_injection_screen():
    from schemas.policy import GuardrailPolicy

    assert GuardrailPolicy(injection="block", injection_similarity=0.9).injection_similarity == 0.9
    with pytest.raises(ValueError, match="injection_similarity needs injection: block"):
        GuardrailPolicy(injection_similarity=0.9)
