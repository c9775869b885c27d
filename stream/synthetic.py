"""A seeded synthetic impression/click stream, and a producer for it.

Impressions are served at a steady event-time rate to random users; each is
clicked with probability ``click_rate`` after a log-normal delay (median
``median_click_delay_s``; a tail lands after the attribution window, giving
corrections, and a few past the correction horizon). Records arrive in event
time order with a small jitter below the allowed lateness, as a real log would.

>>> imps, clicks = generate_stream(StreamSpec(impressions=100, seed=1))
>>> len(imps), 0 < len(clicks) < 40
(100, True)
"""
from __future__ import annotations

import math
import random
from typing import Iterator

from em3 import codec
from em3.config import KafkaSettings, TopicNames
from em3.constraints import NonNegFloat, PositiveFloat, PositiveInt, Probability, config_class
from em3.types import Click, Conversion, Impression

__all__ = ["StreamSpec", "generate_stream", "generate_conversions", "arrival_order", "produce_stream"]


@config_class
class StreamSpec:
    """Shape of the synthetic stream.

    Parameters
    ----------
    impressions : how many impressions.
    click_rate : probability that an impression is clicked.
    users, items : population sizes.
    rate_per_s : impressions per event-time second.
    median_click_delay_s : median of the log-normal click delay.
    click_delay_sigma : log-normal sigma of the click delay.
    repeat_click_rate : probability that a click is sent twice.
    jitter_s : arrival jitter (keep below the join's allowed lateness).
    start : event time of the first impression (seconds since the epoch).
    seed : random seed.
    """

    impressions: PositiveInt = 200_000
    click_rate: Probability = 0.1
    users: PositiveInt = 20_000
    items: PositiveInt = 5_000
    rate_per_s: PositiveFloat = 1000.0
    median_click_delay_s: PositiveFloat = 8.0
    click_delay_sigma: NonNegFloat = 1.2
    repeat_click_rate: Probability = 0.02
    jitter_s: NonNegFloat = 1.0
    start: float = 1_767_225_600.0  # 2026-01-01
    seed: int = 0


def generate_stream(spec: StreamSpec) -> tuple[list[Impression], list[Click]]:
    """The impressions and clicks of ``spec`` (clicks in no particular order)."""
    rng = random.Random(spec.seed)
    impressions: list[Impression] = []
    clicks: list[Click] = []
    mu = math.log(spec.median_click_delay_s)
    for k in range(spec.impressions):
        user = f"u{rng.randrange(spec.users)}"
        imp = Impression(
            impression_id=f"imp-{spec.seed}-{k}",
            request_id=f"req-{spec.seed}-{k // 10}",
            user_id=user,
            item_id=f"i{rng.randrange(spec.items)}",
            position=k % 10,
            served_at=round(spec.start + k / spec.rate_per_s, 3),
            model_line="main",
            propensity=0.1,
        )
        impressions.append(imp)
        if rng.random() < spec.click_rate:
            delay = rng.lognormvariate(mu, spec.click_delay_sigma)
            click = Click(imp.impression_id, user, imp.item_id, round(imp.served_at + delay, 3))
            clicks.append(click)
            if rng.random() < spec.repeat_click_rate:
                clicks.append(Click(imp.impression_id, user, imp.item_id, round(click.clicked_at + 1.0, 3)))
    return impressions, clicks


def generate_conversions(clicks: list[Click], rate: float = 0.2, median_delay_s: float = 1800.0,
                         delay_sigma: float = 1.0, seed: int = 0) -> list[Conversion]:
    """Conversions of clicked impressions: each impression's first click converts with
    probability ``rate``, a log-normal delay later (median ``median_delay_s``), with a
    value (log-normal, median 30).

    >>> imps, clicks = generate_stream(StreamSpec(impressions=2000, seed=1))
    >>> convs = generate_conversions(clicks, rate=0.5, seed=1)
    >>> 0 < len(convs) < len(clicks), all(c.value > 0 for c in convs)
    (True, True)
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], but {rate!r} is given")
    if not (median_delay_s > 0 and delay_sigma >= 0):
        raise ValueError(f"median_delay_s must be > 0 and delay_sigma >= 0, but {median_delay_s!r} and "
                         f"{delay_sigma!r} are given")
    rng = random.Random(seed)
    first: dict[str, Click] = {}
    for c in clicks:
        if c.impression_id not in first or c.clicked_at < first[c.impression_id].clicked_at:
            first[c.impression_id] = c
    mu = math.log(median_delay_s)
    out = []
    for c in first.values():
        if rng.random() < rate:
            at = round(c.clicked_at + rng.lognormvariate(mu, delay_sigma), 3)
            out.append(Conversion(c.impression_id, c.user_id, c.item_id, at, round(rng.lognormvariate(3.4, 0.5), 2)))
    return out


def arrival_order(
    impressions: list[Impression], clicks: list[Click], jitter_s: float, seed: int = 0,
    conversions: list[Conversion] = (),
) -> Iterator[Impression | Click | Conversion]:
    """Records in event-time order, each delayed by a uniform jitter in ``[0, jitter_s)``."""
    rng = random.Random(seed)
    keyed = [(imp.served_at + rng.random() * jitter_s, 0, i) for i, imp in enumerate(impressions)]
    keyed += [(c.clicked_at + rng.random() * jitter_s, 1, i) for i, c in enumerate(clicks)]
    keyed += [(c.converted_at + rng.random() * jitter_s, 2, i) for i, c in enumerate(conversions)]
    keyed.sort()
    sources = (impressions, clicks, conversions)
    for _, kind, i in keyed:
        yield sources[kind][i]


def produce_stream(
    kafka_settings: KafkaSettings, topics: TopicNames, records: Iterator[Impression | Click | Conversion]
) -> int:
    """Produce ``records`` keyed by user id to their topics; returns how many."""
    from stream.kafka import make_producer

    producer = make_producer(kafka_settings)
    n = 0
    for rec in records:
        topic = (topics.impressions if isinstance(rec, Impression) else
                 topics.clicks if isinstance(rec, Click) else topics.conversions)
        value = codec.encode(rec)
        while True:
            try:
                producer.produce(topic, value=value, key=rec.user_id)
                break
            except BufferError:
                producer.poll(0.1)
        n += 1
        if n % 10000 == 0:
            producer.poll(0)
    remaining = producer.flush(60)
    if remaining:
        raise TimeoutError(f"{remaining} records not delivered within 60 s")
    return n
