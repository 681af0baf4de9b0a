"""Request -> prompt token ids, the way vLLM's OpenAI server computes them.

Completions: a string prompt is encoded with add_special_tokens (default true, as in vLLM); token-id prompts
are used as given. Chat: the messages are rendered with the model's chat template to text
(add_generation_prompt defaults to true) and encoded with add_special_tokens (default false, as in vLLM,
because the template already carries BOS).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class PromptError(ValueError):
    """The request's prompt or messages cannot be turned into tokens (a client error)."""


class PromptTokenizer:
    def __init__(self, path_or_name: str, *, cache_size: int = 4096) -> None:
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path_or_name)
        # Identical prompts recur (retries, benchmark loops, fixed few-shot prefixes sent alone): cache them.
        self._encode = lru_cache(maxsize=cache_size)(self._encode_uncached)

    def _encode_uncached(self, text: str, add_special_tokens: bool) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def completion_tokens(self, body: dict[str, Any]) -> list[int]:
        """Token ids of a /v1/completions request's (first) prompt."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of prompts: route by the first
        if isinstance(prompt, str):
            return list(self._encode(prompt, bool(body.get("add_special_tokens", True))))
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise PromptError("'prompt' must be a string, a list of token ids, or a list of either")

    def chat_tokens(self, body: dict[str, Any]) -> list[int]:
        """Token ids of a /v1/chat/completions request, rendered through the chat template."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise PromptError("'messages' must be a non-empty list of message objects")
        kwargs = dict(body.get("chat_template_kwargs") or {})
        try:
            text = self.tokenizer.apply_chat_template(
                [_normalize_message(m) for m in messages],
                tools=body.get("tools"),
                chat_template=body.get("chat_template"),
                add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                continue_final_message=bool(body.get("continue_final_message", False)),
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # template errors are the client's (bad roles, missing fields)
            raise PromptError(f"cannot apply the chat template: {exc}") from exc
        return list(self._encode(text, bool(body.get("add_special_tokens", False))))


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """Text-only content parts are joined into one string, as vLLM does for string-content templates."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        message = {**message, "content": "\n".join(texts)}
    return message
