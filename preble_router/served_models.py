"""The models a router fronts: which backends serve each, and the tokenizer each request is rendered with.

One router may front backends that serve different models (`--model` for the first, `--model-dir NAME=PATH` for
each other one). A backend serves what its GET /v1/models lists (the health probes read it: Backend.models, with
LoRA adapters among them). Rules, in one place:

- A request goes only to backends that list its `model` (none named: the default model). When no backend lists it (the `--model` name itself
  while probes have not yet answered, or a backend that lists another alias of the one model it serves), every
  backend is eligible: a router fronting one model routes as if it did not know model names at all.
- Its prompt is tokenized with its model's tokenizer, loaded on first use; a LoRA adapter's with the base model's
  (the entry the adapter's backend lists without a parent). A model no tokenizer was given for is tokenized with
  the default one (its block keys then still group equal prompts, but predicted cached tokens may be off) and
  this is logged once as a WARNING.
- Block keys chain from the model's name (block_hash.chain_root), so two models never share a cached prefix;
  a backend's KV events are keyed with the model it serves (model_of).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from preble_router.backends import Backend

if TYPE_CHECKING:
    from preble_router.tokens import PromptTokenizer

log = logging.getLogger(__name__)


class ServedModels:
    """The default model (`--model`, its tokenizer given) and any others by served name -> tokenizer path.

    Invariant: `tokenizers` holds only models in `names`; a tokenizer is loaded at most once per model."""

    __slots__ = ("default", "_paths", "_tokenizers", "_load", "_warned")

    def __init__(self, default: str, tokenizer: PromptTokenizer | None, others: Mapping[str, str] | None = None,
                 *, load: Callable[[str], PromptTokenizer] | None = None) -> None:
        self.default = default
        self._paths = dict(others or {})
        self._paths.pop(default, None)
        self._tokenizers: dict[str, PromptTokenizer] = {default: tokenizer} if tokenizer is not None else {}
        self._load = load or _load_tokenizer
        self._warned: set[str] = set()

    @property
    def names(self) -> set[str]:
        return {self.default, *self._paths}

    def configured(self, name: str) -> bool:
        """name in names, without building the set."""
        return name == self.default or name in self._paths

    def base_of(self, requested: str | None, backends: Iterable[Backend]) -> str:
        """The configured model a request for `requested` runs on: itself if configured, a LoRA adapter's base
        (what its backend serves), else the default."""
        if requested is None or requested == self.default or requested in self._paths:
            return requested or self.default
        for b in backends:
            if requested in b.lora_models:
                return self.model_of(b)
        return self.default

    def model_of(self, backend: Backend) -> str:
        """The configured model a backend serves: the first of its listed (non-adapter) models that is
        configured; the default when it lists none of them."""
        for name in backend.models:
            if name not in backend.lora_models and (name == self.default or name in self._paths):
                return name
        return self.default

    def tokenizer(self, model: str) -> PromptTokenizer | None:
        """The model's tokenizer, loaded on first use; the default one for a model given none."""
        found = self._tokenizers.get(model)
        if found is not None:
            return found
        path = self._paths.get(model)
        if path is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("model %r has no tokenizer (start the router with --model-dir %s=PATH): its prompts are "
                            "tokenized with %r's, so predicted cached tokens may be off", model, model, self.default)
            return self._tokenizers.get(self.default)
        log.info("loading the tokenizer of model %r from %s", model, path)
        found = self._tokenizers[model] = self._load(path)
        return found

    @staticmethod
    def eligible(requested: str | None, backends: list[Backend]) -> list[Backend]:
        """The backends a request for `requested` may go to (module docstring: all, when none lists it). Given
        every backend, healthy or not: a model whose backends are all down has none, not everyone else's."""
        if requested is None:
            return backends
        listing = [b for b in backends if requested in b.models]
        return listing or backends


def _load_tokenizer(path: str) -> PromptTokenizer:
    from preble_router.tokens import PromptTokenizer  # transformers: not loaded by the simulator

    return PromptTokenizer(path)
