"""Several models behind one router (served_models.py): a request reaches only backends serving its model, with
its model's tokenizer (loaded once, on first use) and its own block keys."""

from __future__ import annotations

import logging

from preble_router.backends import Backend
from preble_router.block_hash import chain_root
from preble_router.policies import make_policy
from preble_router.router import BlockSource, Router
from preble_router.served_models import ServedModels

BS = 4


class FakeTokenizer:
    """A fake PromptTokenizer: a prompt's tokens are its characters' codes plus an offset naming the model."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def completion_tokens(self, body: dict) -> list[int]:
        return [ord(c) + self.offset for c in body["prompt"]]


def _router(loads: list[str]) -> Router:
    def load(path: str) -> FakeTokenizer:
        loads.append(path)
        return FakeTokenizer(1000)

    router = Router(model="a", tokenizer=FakeTokenizer(0), policy=make_policy("least_load"), clock=lambda: 0.0,
                    models={"b": "/models/b"})
    router.served._load = load
    for url, models in (("http://a1", ("a",)), ("http://a2", ("a", "a-lora")), ("http://b1", ("b",))):
        backend = router.add_backend(url, blocks=BlockSource.ESTIMATED, block_size=BS, capacity_blocks=64,
                                     healthy=True)
        backend.models = models
        backend.lora_models = frozenset(m for m in models if m.endswith("-lora"))
    return router


def _urls(router: Router, prepared) -> set[str]:
    return {s.url for s in router.snapshot(prepared).backends}


def test_requests_reach_only_backends_serving_their_model():
    loads: list[str] = []
    router = _router(loads)
    a = router.prepare("completions", {"model": "a", "prompt": "x" * 12})
    b = router.prepare("completions", {"model": "b", "prompt": "x" * 12})
    adapter = router.prepare("completions", {"model": "a-lora", "prompt": "x" * 12})
    assert _urls(router, a) == {"http://a1", "http://a2"}
    assert _urls(router, b) == {"http://b1"}
    assert _urls(router, adapter) == {"http://a2"}
    assert _urls(router, router.prepare("completions", {"prompt": "x" * 12})) == {"http://a1", "http://a2"}  # default
    assert router.known_models() == {"a", "a-lora", "b"}
    # b's tokenizer, loaded once; the adapter uses its base model's (a's)
    assert list(b.tokens) == [ord("x") + 1000] * 12 and list(a.tokens) == list(adapter.tokens) == [ord("x")] * 12
    router.prepare("completions", {"model": "b", "prompt": "y"})
    assert loads == ["/models/b"]
    # keys chain from the model (and the adapter): never shared across models
    assert a.keys_by_block_size[BS][0] != adapter.keys_by_block_size[BS][0]
    same_tokens = router.prepare_tokens(list(a.tokens), model="b")
    assert same_tokens.keys_by_block_size[BS] != a.keys_by_block_size[BS]


def test_a_model_whose_backends_are_all_down_gets_none_of_the_others():
    router = _router([])
    for b in router.backends.values():
        b.healthy = b.url != "http://b1"
    assert router.decide(router.prepare("completions", {"model": "b", "prompt": "x" * 8})) is None


def test_one_model_routes_as_before_whatever_the_backends_list():
    served = ServedModels("/path/to/model", None)
    listing_alias = [Backend(0, "http://x", models=("tiny",)), Backend(1, "http://y", models=("tiny",))]
    unprobed = [Backend(0, "http://x"), Backend(1, "http://y")]
    for backends in (listing_alias, unprobed):
        assert ServedModels.eligible("/path/to/model", backends) == backends
        assert ServedModels.eligible(None, backends) == backends
        assert served.base_of("tiny", backends) == "/path/to/model"  # an alias: the default model's keys
        assert all(served.model_of(b) == "/path/to/model" for b in backends)
    assert chain_root(served.base_of("tiny", unprobed)) == chain_root("/path/to/model")


def test_a_model_without_a_tokenizer_uses_the_default_one_and_says_so(caplog):
    default = FakeTokenizer(0)
    served = ServedModels("a", default)
    with caplog.at_level(logging.WARNING, logger="preble_router.served_models"):
        assert served.tokenizer("c") is default
        assert served.tokenizer("c") is default
    assert len([r for r in caplog.records if "--model-dir c=PATH" in r.getMessage()]) == 1


def test_probes_key_a_backends_events_with_the_model_it_serves():
    router = _router([])
    b1 = next(b for b in router.backends.values() if b.url == "http://b1")
    router.index.set_model(b1.backend_id, router.served.model_of(b1))
    assert router.index._backends[b1.backend_id].model == "b"
