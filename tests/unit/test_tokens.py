"""Prompt tokenization: the same ids vLLM computes, and chunked encoding exactly equal to whole-text encoding."""

from __future__ import annotations

import glob
import random
from array import array

import pytest

from preble_router.tokens import PromptError, PromptTokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return PromptTokenizer(str(tiny_model))


def corpus() -> str:
    return "\n".join(open(f, errors="replace").read() for f in sorted(glob.glob("/usr/share/common-licenses/*"))[:6])


def test_chunked_encoding_is_exact(tok):
    assert tok.chunked is not None and tok.chunked.enabled
    text, rng = corpus(), random.Random(0)
    alphabet = list("abc xyz  \n\t.,;:'\"!?-_()[]{}0123456789éü中🙂") + [" the", "  ", "\n\n", "'s", " 12345"]
    for i in range(200):
        start = rng.randrange(len(text) - 6000)
        sample = text[start : start + rng.randrange(1000, 6000)]
        if i % 2:  # and noise that is nothing like prose
            sample += "".join(rng.choice(alphabet) for _ in range(rng.randrange(1500, 3000)))
        for special in (True, False):
            whole = tok.tokenizer(sample, add_special_tokens=special)["input_ids"]
            assert list(tok.chunked._encode_chunked(sample, special)) == whole, (i, special)
    assert tok.chunked.enabled


def test_completion_prompt_forms(tok):
    assert list(tok.completion_tokens({"prompt": "hello world"})) == tok.tokenizer("hello world")["input_ids"]
    assert list(tok.completion_tokens({"prompt": "hello", "add_special_tokens": False})) == \
        tok.tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert tok.completion_tokens({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert tok.completion_tokens({"prompt": ["first", "second"]}) == tok.completion_tokens({"prompt": "first"})
    assert tok.completion_tokens({"prompt": [[1, 2], [3]]}) == [1, 2]
    for bad in ({"prompt": {"a": 1}}, {"prompt": [1, "x"]}, {"prompt": [True, 2]}, {}):
        with pytest.raises(PromptError):
            tok.completion_tokens(bad)


def test_chat_matches_the_template_as_vllm_applies_it(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    expected = tok.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert list(tok.chat_tokens({"messages": messages})) == \
        tok.tokenizer(expected, add_special_tokens=False)["input_ids"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    joined = [{"role": "user", "content": "a\nb"}]
    assert tok.chat_tokens({"messages": parts}) == tok.chat_tokens({"messages": joined})
    with pytest.raises(PromptError):
        tok.chat_tokens({"messages": []})


def test_text_prompts_come_back_as_fresh_arrays(tok):
    """array("I") is what block hashing reads without conversion; each call gets its own copy of a cached one."""
    first = tok.completion_tokens({"prompt": "hello world " * 300})
    assert isinstance(first, array) and first.typecode == "I"
    original = list(first)
    first[0] += 1  # a caller writing into its tokens must not change the cached encoding
    assert list(tok.completion_tokens({"prompt": "hello world " * 300})) == original


def test_cached_prompts_are_told_apart(tok):
    """Whole prompts and chunks are cached under a digest of their text: texts that differ anywhere (one
    character, the special-tokens flag) never share an entry, and repeats agree with a cold encoding."""
    base = corpus()[:9000]
    texts = [base, base[:-1] + "!", "!" + base[1:], base[:4000] + "é" + base[4001:], base[:4000] + "中" + base[4001:],
             base + " ", base[:3000]]
    for _ in range(2):  # the second round comes from the caches
        for text in texts:
            for special in (True, False):
                expected = tok.tokenizer(text, add_special_tokens=special)["input_ids"]
                assert list(tok._tokens(text, special)) == expected


def test_router_numbers_requests_itself(tok):
    from preble_router.policies import LeastLoadPolicy
    from preble_router.router import Router

    router = Router(model="tiny", tokenizer=tok, policy=LeastLoadPolicy())
    body = {"prompt": "hello", "request_id": "same"}  # clients may repeat ids; policies key state by them
    assert router.prepare("completions", body).request_id != router.prepare("completions", body).request_id


def _wrong_chunks(tokenizer: PromptTokenizer) -> None:
    """Make the chunked path disagree with whole-text encoding (a tokenizer the self-check did not catch)."""
    real = tokenizer.chunked._encode_chunked

    def off_by_one(text, special):
        ids = real(text, special)
        ids[-1] += 1
        return ids

    tokenizer.chunked._encode_chunked = off_by_one


def test_without_an_event_loop_a_mismatch_is_caught_before_the_ids_are_returned(tiny_model):
    tok = PromptTokenizer(str(tiny_model))
    _wrong_chunks(tok)
    text = corpus()[:5000]
    assert list(tok.completion_tokens({"prompt": text})) == tok.tokenizer(text)["input_ids"]
    assert not tok.chunked.enabled


def test_serving_checks_run_after_the_request_not_before(tiny_model):
    """On an event loop the sampled check waits for the loop's next turn (the request has gone out by then); a
    mismatch found there turns chunking off and drops what was cached from it, so the next encoding is exact."""
    import asyncio

    tok = PromptTokenizer(str(tiny_model))
    text = corpus()[:5000]
    expected = tok.tokenizer(text)["input_ids"]

    async def serve() -> tuple[list[int], bool, list[int]]:
        first = list(tok.completion_tokens({"prompt": text}))
        queued = tok.chunked.checks_pending
        await asyncio.sleep(0)  # the loop's next turn
        assert not tok.chunked.checks_pending and tok.chunked.enabled  # checked, and it agreed
        _wrong_chunks(tok)
        tok.completion_tokens({"prompt": text + " more"})
        await asyncio.sleep(0)
        return first, queued, list(tok.completion_tokens({"prompt": text + " more"}))

    first, queued, after = asyncio.run(serve())
    assert first == expected and queued
    assert not tok.chunked.enabled
    assert after == tok.tokenizer(text + " more")["input_ids"]
