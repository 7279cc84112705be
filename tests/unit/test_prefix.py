"""The prefix-hash key: every turn of a conversation gets the same key; other conversations spread;
tenants never share one."""

from schemas import InferenceRequest
from shared.prefix import PROMPT_PREFIX_CHARS, prefix_hash

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def req(messages=None, prompt=None, tenant="acme", prefix_key=None) -> InferenceRequest:
    return InferenceRequest(tenant=tenant, route="chat", reply_to="svc", messages=messages, prompt=prompt,
                            prefix_key=prefix_key)


def test_every_turn_of_a_conversation_shares_its_key():
    turn1 = [SYSTEM, {"role": "user", "content": "Hello"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Tell me more"}]
    turn3 = turn2 + [{"role": "assistant", "content": "Rivers..."}, {"role": "user", "content": "And seas?"}]
    assert prefix_hash(req(turn1)) == prefix_hash(req(turn2)) == prefix_hash(req(turn3))
    assert prefix_hash(req(turn1[1:])) == prefix_hash(req(turn2[1:]))  # without a system prompt too


def test_conversations_that_share_only_a_system_prompt_spread():
    a = req([SYSTEM, {"role": "user", "content": "What is a river?"}])
    b = req([SYSTEM, {"role": "user", "content": "How tall is the mountain?"}])
    other = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is a river?"}]
    assert len({prefix_hash(a), prefix_hash(b), prefix_hash(req(other))}) == 3


def test_single_message_requests_spread_by_content():
    a = req([{"role": "user", "content": "one"}])
    b = req([{"role": "user", "content": "two"}])
    assert prefix_hash(a) != prefix_hash(b)


def test_tenants_never_share_a_key():
    messages = [SYSTEM, {"role": "user", "content": "hi"}]
    assert prefix_hash(req(messages, tenant="acme")) != prefix_hash(req(messages, tenant="globex"))


def test_explicit_session_key_overrides_content():
    a = req([{"role": "user", "content": "one"}], prefix_key="session-42")
    b = req([{"role": "user", "content": "two"}], prefix_key="session-42")
    assert prefix_hash(a) == prefix_hash(b)
    assert prefix_hash(a) != prefix_hash(req([{"role": "user", "content": "one"}], prefix_key="session-43"))


def test_prompts_are_keyed_by_their_head():
    head = "x" * PROMPT_PREFIX_CHARS
    assert prefix_hash(req(prompt=head + "tail one")) == prefix_hash(req(prompt=head + "tail two"))
    assert prefix_hash(req(prompt="short a")) != prefix_hash(req(prompt="short b"))


def test_key_is_stable_hex():
    key = prefix_hash(req([SYSTEM, {"role": "user", "content": "hi"}]))
    assert len(key) == 32 and int(key, 16) >= 0
    assert key == prefix_hash(req([SYSTEM, {"role": "user", "content": "hi"}]))
