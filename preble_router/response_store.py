"""Which backend holds which stored Response (OpenAI Responses API, vLLM's in-memory response store).

vLLM keeps a stored response in the memory of the replica that produced it: a follow-up with
`previous_response_id`, and `GET /v1/responses/{id}` or `POST /v1/responses/{id}/cancel`, only work there. The
proxy learns each response's holder from the reply (a whole reply's `id`, a stream's `response.created` event) and
sends those requests to it.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_CAPACITY = 65536


class ResponseStore:
    """response id -> URL of the backend that produced it, least recently used first.

    Invariant: len(self) <= capacity; an id maps to the backend of the latest reply that named it. The URL (not
    the router's backend number, which a later backend may reuse) names the backend. Ids dropped past capacity,
    or learned by another router, are found again by asking the backends (Proxy._response_holder).
    """

    __slots__ = ("_holders", "capacity")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._holders: OrderedDict[str, str] = OrderedDict()

    def learn(self, response_id: str, backend_url: str) -> None:
        self._holders[response_id] = backend_url
        self._holders.move_to_end(response_id)
        if len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def holder(self, response_id: str) -> str | None:
        """The backend URL that holds response_id (a use: it becomes the most recently used), or None."""
        url = self._holders.get(response_id)
        if url is not None:
            self._holders.move_to_end(response_id)
        return url

    def __len__(self) -> int:
        return len(self._holders)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._holders
