"""Simulated users talk to the real ranking service over HTTP.

:class:`HTTPRanker` is a :class:`simulators.rankers.Ranker` backed by the
serving API (``POST /v1/rank``, see :mod:`serving.app`): the server buckets
the user into an arm, ranks, and logs the impressions itself, so the runner
takes the arm, impression ids and propensities from the answer (use it with
``ABConfig(arm_from_ranking=True)``, every arm name mapped to the one
client). :meth:`HTTPRanker.click_sink` gives an ``event_sink`` for the A/B
runner that posts each click, when it is due, to ``POST /v1/click``, and each
conversion to ``POST /v1/conversion``.
:meth:`HTTPRanker.register_items` posts item content (``POST /v1/items``), for
example the world's new arrivals.

``httpx`` is imported lazily; a ready client (for example one with an
``httpx.MockTransport`` in tests) can be passed in.
"""
from __future__ import annotations

import base64
import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

from em3.types import Click, Conversion, Impression, ItemContent
from simulators.rankers import Ranking

__all__ = ["HTTPRanker"]

logger = logging.getLogger(__name__)


class HTTPRanker:
    """A ranker that asks the ranking service.

    Parameters
    ----------
    base_url : str
        For example ``"http://127.0.0.1:8000"``.
    timeout_s : float
        Per-request timeout.
    client : httpx.Client, optional
        A client to use instead of a new one.
    drop_context_keys : sequence of str
        Context keys the runner adds for in-process rankers (``"t"``) and the
        server does not need.
    api_key : str
        Sent as ``Authorization: Bearer KEY`` with every request (the server's
        write endpoints need it); empty sends none.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, timeout_s: float = 10.0,
                 client: Any = None, drop_context_keys: Sequence[str] = ("t",), api_key: str = "") -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, but {timeout_s} is given")
        if client is None:
            import httpx

            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            client = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)
        self._client = client
        self._drop = frozenset(drop_context_keys)
        self.clicks_posted = 0
        self.click_errors = 0
        self.conversions_posted = 0
        self.conversion_errors = 0

    def rank(self, user_id: str, candidates: Sequence[str], context: Mapping[str, str], k: int,
             explain: bool = False) -> Ranking:
        """``POST /v1/rank``; raises ``httpx.HTTPStatusError`` on a non-2xx answer.
        ``explain`` asks the server to explain each item (``Ranking.explanations``)."""
        if k <= 0:
            raise ValueError(f"k must be > 0, but {k} is given")
        body = {"user_id": user_id, "item_ids": list(candidates),
                "context": {key: v for key, v in context.items() if key not in self._drop}, "k": k}
        if explain:
            body["explain"] = True
        response = self._client.post("/v1/rank", json=body)
        response.raise_for_status()
        data = response.json()
        items = data["items"]
        return Ranking(
            item_ids=tuple(i["item_id"] for i in items),
            arm=str(data["arm"]),
            propensities=tuple(float(i.get("propensity", 1.0)) for i in items),
            model_version=int(data.get("model_version", 0)),
            impression_ids=tuple(i["impression_id"] for i in items),
            request_id=data.get("request_id"),
            scores=tuple(float(i["score"]) for i in items) if all("score" in i for i in items) else None,
            explanations=tuple(i.get("explanation") for i in items) if explain else None,
        )

    def post_click(self, click: Click) -> bool:
        """``POST /v1/click`` with the click's event time; False (counted, logged) on failure."""
        body = {"impression_id": click.impression_id, "user_id": click.user_id, "item_id": click.item_id,
                "clicked_at": click.clicked_at}
        try:
            response = self._client.post("/v1/click", json=body)
            response.raise_for_status()
        except Exception as exc:  # noqa: BLE001 - any transport or HTTP failure is counted, not fatal
            self.click_errors += 1
            if self.click_errors <= 5:
                logger.warning("posting a click failed: %r", exc)
            return False
        self.clicks_posted += 1
        return True

    def post_conversion(self, conversion: Conversion) -> bool:
        """``POST /v1/conversion`` with the conversion's event time and value; False
        (counted, logged) on failure."""
        body = {"impression_id": conversion.impression_id, "user_id": conversion.user_id,
                "item_id": conversion.item_id, "converted_at": conversion.converted_at}
        if conversion.value is not None:
            body["value"] = conversion.value
        try:
            response = self._client.post("/v1/conversion", json=body)
            response.raise_for_status()
        except Exception as exc:  # noqa: BLE001 - any transport or HTTP failure is counted, not fatal
            self.conversion_errors += 1
            if self.conversion_errors <= 5:
                logger.warning("posting a conversion failed: %r", exc)
            return False
        self.conversions_posted += 1
        return True

    def click_sink(self) -> Callable[[Impression | Click | Conversion], None]:
        """An ``event_sink`` for :class:`simulators.ab.ABRunner`: posts clicks and
        conversions, skips impressions (the server logged them when it ranked)."""

        def sink(event: Impression | Click | Conversion) -> None:
            if isinstance(event, Click):
                self.post_click(event)
            elif isinstance(event, Conversion):
                self.post_conversion(event)

        return sink

    def register_items(self, items: Iterable[ItemContent], batch_size: int = 64) -> int:
        """``POST /v1/items`` in batches; returns how many were sent."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, but {batch_size} is given")
        sent = 0
        batch: list[dict[str, Any]] = []
        for item in items:
            entry: dict[str, Any] = {"item_id": item.item_id, "text": item.text,
                                     "attributes": dict(item.attributes)}
            if item.image is not None:
                entry["image"] = base64.b64encode(item.image).decode("ascii")
            if item.image_ref is not None:
                entry["image_ref"] = item.image_ref
            batch.append(entry)
            if len(batch) >= batch_size:
                sent += self._post_items(batch)
                batch = []
        if batch:
            sent += self._post_items(batch)
        return sent

    def _post_items(self, batch: list[dict[str, Any]]) -> int:
        response = self._client.post("/v1/items", json={"items": batch})
        response.raise_for_status()
        return len(batch)

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()
