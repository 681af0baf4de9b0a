"""Messages and Responses bodies -> chat bodies, tokenized as vLLM 0.32 CPU tokenizes them. The expected counts
were measured on a real replica of the tiny model (count_tokens, usage.input_tokens, stream message_start)."""

from __future__ import annotations

import pytest

from preble_router.chat_convert import messages_to_chat, requires_system_first, responses_to_chat
from preble_router.tokens import PromptError, PromptTokenizer

SYSTEM = "You are a careful assistant. " * 40


@pytest.fixture(scope="module")
def tok(tiny_model):
    return PromptTokenizer(str(tiny_model))


def test_tiny_template_makes_vllm_merge_inline_system(tok):
    # vLLM 0.32 logged "The chat template requires system-first ordering" for this template.
    assert requires_system_first(tok.tokenizer)


def test_messages_prompt_length_equals_vllm(tok):
    body = {"model": "tiny", "max_tokens": 4, "system": SYSTEM,
            "messages": [{"role": "user", "content": "hello there " * 20}]}
    assert len(tok.chat_tokens(messages_to_chat(body, merge_inline_system=True))) == 607
    parts = {"model": "tiny", "max_tokens": 4, "system": [{"type": "text", "text": SYSTEM}],
             "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]}
    assert len(tok.chat_tokens(messages_to_chat(parts, merge_inline_system=True))) == 535


def test_messages_inline_system_merged_and_tools_converted():
    body = {"model": "tiny", "max_tokens": 4, "system": "A",
            "messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "B"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "f",
                                                            "input": {"x": 1}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "r"}]}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}], "cache_salt": "s"}
    chat = messages_to_chat(body, merge_inline_system=True)
    assert chat["messages"][0] == {"role": "system", "content": "AB"}
    assert chat["messages"][2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "c1", "content": "r"}
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "description": None,
                                                               "parameters": {"type": "object"}}}]
    assert chat["cache_salt"] == "s" and chat["max_tokens"] == 4


def test_responses_prompt_length_equals_vllm(tok):
    # vLLM encodes the rendered Responses prompt with add_special_tokens: one more BOS than chat.
    body = {"model": "tiny", "max_output_tokens": 4, "instructions": SYSTEM, "input": "hello there " * 20}
    assert len(tok.chat_tokens(responses_to_chat(body))) == 608
    items = {"model": "tiny", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "x"}, {"type": "input_text", "text": "y"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"role": "user", "content": "z"}]}
    assert len(tok.chat_tokens(responses_to_chat(items))) == 46


@pytest.mark.parametrize("body", [{"messages": "hi"}, {"messages": []}, {"messages": [{"role": "user", "content": 5}]}])
def test_bad_messages_bodies(body):
    with pytest.raises(PromptError):
        messages_to_chat(body, merge_inline_system=False)


@pytest.mark.parametrize("body", [{"input": 5}, {"input": [{"type": "nope"}]}, {"input": "x", "instructions": 3}])
def test_bad_responses_bodies(body):
    with pytest.raises(PromptError):
        responses_to_chat(body)


def test_router_prepares_messages_and_responses_as_rendered(tok):
    from preble_router.policies import LeastLoadPolicy
    from preble_router.router import Endpoint, Router

    router = Router(model="tiny", tokenizer=tok, policy=LeastLoadPolicy())
    router.add_backend("http://b", block_size=32, healthy=True)
    messages = {"model": "tiny", "max_tokens": 4, "system": SYSTEM, "messages": [{"role": "user", "content": "hi"}]}
    prepared = router.prepare(Endpoint.MESSAGES, messages)
    assert list(prepared.tokens) == list(tok.chat_tokens(messages_to_chat(messages, merge_inline_system=True)))
    assert prepared.max_tokens == 4 and len(prepared.keys_by_block_size[32]) == len(prepared.tokens) // 32
    responses = {"model": "tiny", "max_output_tokens": 3, "instructions": SYSTEM, "input": "hi"}
    prepared = router.prepare(Endpoint.RESPONSES, responses)
    assert list(prepared.tokens) == list(tok.chat_tokens(responses_to_chat(responses)))
    assert prepared.max_tokens == 3 and prepared.keys_by_block_size[32]
    # A follow-up's history is the backend's: its new input counts for load, and nothing is keyed.
    follow = router.prepare(Endpoint.RESPONSES, {**responses, "previous_response_id": "resp_1"})
    assert len(follow.tokens) == len(prepared.tokens) and follow.keys_by_block_size == {}
    with pytest.raises(ValueError):
        router.prepare("embeddings", messages)
