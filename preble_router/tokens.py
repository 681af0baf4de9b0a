"""Request -> prompt token ids, the way vLLM's OpenAI server computes them.

Completions: a string prompt is encoded with add_special_tokens (default true, as in vLLM); token-id prompts
are used as given. Chat: the messages are rendered with the model's chat template to text
(add_generation_prompt defaults to true) and encoded with add_special_tokens (default false, as in vLLM,
because the template already carries BOS).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from typing import Any

# The router encodes one text per call on its event loop's thread. With parallelism on, the tokenizers library
# hands even a single text to its thread pool and waits for it: on a busy machine the wait for that thread to be
# scheduled costs more than the encoding. It is read once, at the library's first parallel call, so it is set
# here, before any encoding; a value the user set wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402 (after the setting above)
from xxhash import xxh3_128_intdigest  # noqa: E402

log = logging.getLogger(__name__)

# A single space between two non-space characters starts a new pre-token in byte-level BPE tokenizers
# (GPT-2 / Llama-3 style), and BPE never merges across pre-tokens: cutting the text there is exact.
_CUT = re.compile(r"(?<=\S) (?=\S)")
_SELF_CHECK_TEXT = (
    "The router's cache: 3 blocks, 1,024 tokens; tokens/s = 12.5 (p99 < 2x).  Naïve café — ünïcödé!\n"
    "def f(x):\n    return x**2  # comment\n\n\tTabs and    spaces, URLs https://example.com/a?b=c&d=1 "
    "e-mail a.b@c.d, JSON {\"k\": [1, 2.0, null]} 中文字符 日本語 🙂 emoji. It's, we'll, they've. "
)


_MAX_TOKEN_ID = 2**32 - 1


class PromptError(ValueError):
    """The request's prompt or messages cannot be turned into tokens (a client error)."""


class ChunkedEncoder:
    """Encodes long texts in chunks cut at pre-token boundaries, caching each chunk: prompts that share a
    prefix share its chunks, so only the part after the shared prefix is tokenized again.

    Three sizes: a text is looked up in chunks of ~chunk_chars, a chunk not in the cache in parts of ~part_chars,
    and a part not in the cache in pieces of ~piece_chars, of which only the missing ones are encoded (all of a
    chunk's in one batch). A text that recurs costs few lookups; a change inside it costs the encoding of a piece
    and the lookups of one chunk's parts and one part's pieces, not of a whole chunk's pieces.

    Exact only for byte-level BPE without a normalizer: enabled for those alone, after a self-check at load;
    a sample of encodings (the first check_first, then one in check_every) is also checked against whole-text
    tokenization, and any mismatch disables it. The checks wait in a short queue for verify_pending(): a check
    costs about what encoding the prompt whole does (~1 ms for 5k tokens), which a request should not wait for.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, chunk_chars: int = 2048, part_chars: int = 256,
                 piece_chars: int = 32, cache_chunks: int = 4096, cache_parts: int = 16384, cache_pieces: int = 65536,
                 check_first: int = 32, check_every: int = 1024, max_pending: int = 8) -> None:
        self.backend = tokenizer.backend_tokenizer
        # encode_batch_fast leaves out the character offsets (about a third of encode()'s time); same ids.
        self._encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.chunk_chars, self.part_chars, self.piece_chars = chunk_chars, part_chars, piece_chars
        self.check_first = check_first  # the first encodings are all checked, then a sample
        self.check_every = check_every
        self._chunks = _LruCache(cache_chunks)
        self._parts = _LruCache(cache_parts)
        self._pieces = _LruCache(cache_pieces)
        self._encoded = 0
        # (text, add_special_tokens, chunked ids) still to compare with whole-text encoding; past max_pending
        # unverified ones the oldest is dropped (a sample, not a record).
        self._pending: deque[tuple[str, bool, array]] = deque(maxlen=max_pending)
        with_special = self.backend.encode("a", add_special_tokens=True).ids
        plain = self.backend.encode("a", add_special_tokens=False).ids
        at = _find(with_special, plain)
        self._prefix, self._suffix = with_special[:at], with_special[at + len(plain):]
        self.enabled = at >= 0 and _is_byte_level_bpe(self.backend) and all(
            self._encode_chunked(t, s) == self._encode_whole(t, s)
            == array("I", self.backend.encode(t, add_special_tokens=s).ids)
            for t in (_SELF_CHECK_TEXT * 12, "x" + _SELF_CHECK_TEXT * 9) for s in (True, False))
        if not self.enabled:
            log.info("tokenizer: chunked encoding is off (not provably exact for this tokenizer)")

    def encode(self, text: str, add_special_tokens: bool) -> array:
        if not self.enabled or len(text) < 2 * self.piece_chars:
            return self._encode_whole(text, add_special_tokens)
        ids = self._encode_chunked(text, add_special_tokens)
        self._encoded += 1
        if self._encoded <= self.check_first or self._encoded % self.check_every == 0:
            self._pending.append((text, add_special_tokens, ids))
        return ids

    @property
    def checks_pending(self) -> bool:
        return bool(self._pending)

    def verify_pending(self) -> bool:
        """Compare the queued chunked encodings with whole-text encoding. False after a mismatch: chunked
        encoding is then off for good (whatever the caller cached from it is suspect)."""
        while self._pending:
            text, special, ids = self._pending.popleft()
            if ids != self._encode_whole(text, special):
                self.enabled = False
                self._pending.clear()
                log.warning("tokenizer: chunked encoding disagreed with whole-text encoding; switched it off")
                return False
        return True

    def _encode_whole(self, text: str, add_special_tokens: bool) -> array:
        return array("I", self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def _encode_chunked(self, text: str, add_special_tokens: bool) -> array:
        # Chunks are kept as arrays: joining them is a copy of bytes, and block hashing reads the result as is.
        ids = array("I", self._prefix if add_special_tokens else ())
        for chunk in _cuts(text, self.chunk_chars):
            key = _digest(chunk)
            cached = self._chunks.get(key)
            if cached is None:
                cached = self._encode_pieces(chunk)
                self._chunks.put(key, cached)
            ids.extend(cached)
        if add_special_tokens:
            ids.extend(self._suffix)
        return ids

    def _encode_pieces(self, chunk: str) -> array:
        """A chunk the cache lacks: its parts from the part cache, the missing parts' pieces from the piece cache,
        the missing pieces encoded in one batch."""
        parts = list(_cuts(chunk, self.part_chars))
        found = [self._parts.get(part) for part in parts]
        missing = [i for i, ids in enumerate(found) if ids is None]
        if missing:
            pieces_of = {i: list(_cuts(parts[i], self.piece_chars)) for i in missing}
            piece_ids = {i: [self._pieces.get(piece) for piece in pieces] for i, pieces in pieces_of.items()}
            new = [piece for i in missing for piece, ids in zip(pieces_of[i], piece_ids[i]) if ids is None]
            encoded = iter(self._encode_batch(new, add_special_tokens=False)) if new else iter(())
            for i in missing:
                ids_list, ids = piece_ids[i], array("I")
                for j, piece_id in enumerate(ids_list):
                    if piece_id is None:
                        piece_id = array("I", next(encoded).ids)
                        self._pieces.put(pieces_of[i][j], piece_id)
                    ids.extend(piece_id)
                found[i] = ids
                self._parts.put(parts[i], ids)
        out = array("I")
        for ids in found:
            out.extend(ids)
        return out


def _digest(text: str) -> int:
    """The cache key of a long text (a whole prompt, a chunk): its 128-bit xxh3 digest. A str key costs a SipHash of
    every character on each lookup (a prompt arrives as a new str object, so its hash is never cached) and a
    comparison on a hit; xxh3 over the UTF-8 bytes is several times faster, and equal digests mean equal texts as
    surely as BlockKeyCache's do. surrogatepass: a lone surrogate still encodes (to bytes no other text gives)."""
    return xxh3_128_intdigest(text.encode("utf-8", "surrogatepass"))


class _LruCache:
    """text (or its _digest) -> token ids, the least recently used dropped past `capacity` entries."""

    __slots__ = ("_entries", "_capacity")

    def __init__(self, capacity: int) -> None:
        self._entries: OrderedDict[str | int, array] = OrderedDict()
        self._capacity = capacity

    def get(self, text: str | int) -> array | None:
        ids = self._entries.get(text)
        if ids is not None:
            self._entries.move_to_end(text)
        return ids

    def put(self, text: str | int, ids: array) -> None:
        self._entries[text] = ids
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def _cuts(text: str, size: int) -> Iterator[str]:
    """text in consecutive parts of ~size characters (the last up to 2x), each cut at a pre-token boundary."""
    start, end_all = 0, len(text)
    while start < end_all:
        cut = _CUT.search(text, start + size) if end_all - start > 2 * size else None
        end = cut.start() if cut else end_all
        yield text[start:end]
        start = end


def _is_byte_level_bpe(backend: Any) -> bool:
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    return (spec.get("model", {}).get("type") == "BPE" and spec.get("normalizer") is None and len(byte_level) == 1
            and not byte_level[0].get("add_prefix_space", False)
            and all(p.get("type") in ("ByteLevel", "Split") for p in parts))


def _find(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


class PromptTokenizer:
    """Text prompts come back as array("I") of token ids (a fresh copy each time): block hashing reads its bytes
    without converting a list; token-id prompts come back as the client sent them."""

    def __init__(self, path_or_name: str, *, cache_prompts: int = 512, cache_max_chars: int = 32768) -> None:
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path_or_name)
        self.chunked = ChunkedEncoder(self.tokenizer) if self.tokenizer.is_fast else None
        # Identical prompts recur (retries, benchmark loops, fixed few-shot prefixes sent alone): whole prompts up
        # to cache_max_chars are cached too, so memory stays bounded (a longer one is still chunk-cached).
        self._whole = {True: _LruCache(cache_prompts), False: _LruCache(cache_prompts)}
        self._cache_max_chars = cache_max_chars
        self._verify_scheduled = False

    def _tokens(self, text: str, add_special_tokens: bool) -> array:
        """A copy of the cached encoding: a caller may change its tokens without changing the cache."""
        if len(text) > self._cache_max_chars:
            return self._encode_uncached(text, add_special_tokens)
        cache = self._whole[add_special_tokens]
        key = _digest(text)
        ids = cache.get(key)
        if ids is None:
            ids = self._encode_uncached(text, add_special_tokens)
            cache.put(key, ids)
        return array("I", ids)

    def _encode_uncached(self, text: str, add_special_tokens: bool) -> array:
        if self.chunked is not None:
            ids = self.chunked.encode(text, add_special_tokens)
            if self.chunked.checks_pending and not self._verify_scheduled:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no event loop (a script, the simulator): checked now, as it is returned
                    if not self.verify_pending():
                        return self._encode_uncached(text, add_special_tokens)
                else:
                    # Serving: on the loop's next turn, once this request has gone out (a pooled upstream
                    # connection writes it before the request's first wait). A mismatch found then has cost one
                    # request's routing a block or so of precision, never its reply: the engine tokenizes itself.
                    self._verify_scheduled = True
                    loop.call_soon(self.verify_pending)
            return ids
        return array("I", self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def verify_pending(self) -> bool:
        """Run the chunked encoder's queued checks; after a mismatch, forget the prompts cached from it."""
        self._verify_scheduled = False
        if self.chunked is None or self.chunked.verify_pending():
            return True
        for cache in self._whole.values():
            cache.clear()
        return False

    def completion_tokens(self, body: dict[str, Any]) -> Sequence[int]:
        """Token ids of a /v1/completions request's (first) prompt."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of prompts: route by the first
        if isinstance(prompt, str):
            return self._tokens(prompt, bool(body.get("add_special_tokens", True)))
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            # Block hashing reads ids as uint32 (as vLLM's vocabularies fit): anything else is no token of a model.
            if prompt and (min(prompt) < 0 or max(prompt) > _MAX_TOKEN_ID):
                raise PromptError(f"token ids must be between 0 and {_MAX_TOKEN_ID}")
            return prompt
        raise PromptError("'prompt' must be a string, a list of token ids, or a list of either")

    def chat_tokens(self, body: dict[str, Any]) -> Sequence[int]:
        """Token ids of a /v1/chat/completions request, rendered through the chat template."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise PromptError("'messages' must be a non-empty list of message objects")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise PromptError("'chat_template_kwargs' must be an object")
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
        return self._tokens(text, bool(body.get("add_special_tokens", False)))


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """Text-only content parts are joined into one string, as vLLM does for string-content templates."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        message = {**message, "content": "\n".join(texts)}
    return message
