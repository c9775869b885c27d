"""MovieLens-100K as a time-ordered impression stream, read from the ``recbole`` wheel.

Mapping (documented choice): each rating event is an impression of the movie to the
user at the rating time; a click is a rating >= 4 (55% of events). Item text is
``"<title> (<year>) | <genres>"``; the image is the synthetic poster of
:func:`em3.data.images.render_poster`. The user's age bucket, gender and occupation
travel as categorical ``Impression.context``. Ids are strings. Events are sorted by
timestamp, ties kept in file order. The package is located with
``importlib.util.find_spec`` and never imported (its own dependencies conflict with
ours; it is installed with ``--no-deps``).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from em3.data.images import render_poster
from em3.types import Impression, ItemContent, Sample

__all__ = ["MovieLens", "ml100k_dir", "load_ml100k", "click_histories", "CLICK_THRESHOLD"]

logger = logging.getLogger(__name__)
CLICK_THRESHOLD = 4


def ml100k_dir() -> Path:
    """Folder ``recbole/dataset_example/ml-100k`` of the installed recbole wheel."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("recbole is not installed; run `pip install --no-deps recbole==1.2.1`")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "dataset_example" / "ml-100k"
        if (path / "ml-100k.inter").exists():
            return path
    raise FileNotFoundError(f"no dataset_example/ml-100k under {list(spec.submodule_search_locations)}")


@dataclass(frozen=True)
class MovieLens:
    """The stream (``samples``, time-ordered) and the catalogue (``items`` by id)."""

    samples: list[Sample]
    items: dict[str, ItemContent]


def _rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        next(fh)  # header
        return [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def _age_bucket(age: str) -> str:
    try:
        a = int(age)
    except ValueError:
        return "unknown"
    return next(f"<{b}" for b in (18, 25, 35, 45, 56, 200) if a < b)


def load_ml100k(path: str | Path | None = None, *, images: bool = True, image_size: int = 96,
                max_events: int | None = None) -> MovieLens:
    """Load MovieLens-100K.

    Parameters
    ----------
    path : str or Path, optional
        Folder holding ``ml-100k.inter``, ``.item`` and ``.user`` (default: the
        recbole wheel's).
    images : bool
        Render a synthetic poster per item.
    image_size : int
        Poster side in pixels.
    max_events : int, optional
        Keep only the first ``max_events`` events in time order.
    """
    root = Path(path) if path is not None else ml100k_dir()
    items: dict[str, ItemContent] = {}
    for row in _rows(root / "ml-100k.item"):
        iid, title = row[0], row[1].strip() if len(row) > 1 else ""
        year = row[2].strip() if len(row) > 2 else ""
        genres = row[3].split() if len(row) > 3 else []
        text = f"{title} ({year}) | {' '.join(genres)}" if year else f"{title} | {' '.join(genres)}"
        image = render_poster(title, int(year) if year.isdigit() else None, genres, image_size) if images else None
        items[iid] = ItemContent(item_id=iid, text=text, image=image,
                                 attributes={"year": year, "genres": "|".join(genres)})
    users: dict[str, dict[str, str]] = {}
    for row in _rows(root / "ml-100k.user"):
        users[row[0]] = {"age": _age_bucket(row[1]), "gender": row[2], "occupation": row[3]}
    events = []
    for n, row in enumerate(_rows(root / "ml-100k.inter")):
        events.append((float(row[3]), n, row[0], row[1], float(row[2])))
    events.sort()
    if max_events is not None:
        events = events[:max_events]
    samples = []
    for ts, n, uid, iid, rating in events:
        imp = Impression(impression_id=f"ml100k-{n}", request_id=f"ml100k-{n}", user_id=uid, item_id=iid,
                         position=0, served_at=ts, context=users.get(uid, {}))
        samples.append(Sample(impression=imp, label=int(rating >= CLICK_THRESHOLD), label_time=ts))
    logger.info("MovieLens-100K: %d events, %d items, %d users", len(samples), len(items), len(users))
    return MovieLens(samples=samples, items=items)


def click_histories(samples: list[Sample], limit: int) -> list[list[str]]:
    """Per sample, the user's clicked items strictly before its time, newest first.

    ``samples`` must be time-ordered. Clicks at the same timestamp as the sample are
    not included (no label leakage).

    >>> from em3.types import Impression, Sample
    >>> mk = lambda n, u, i, t, y: Sample(Impression(str(n), str(n), u, i, 0, t), y, t)
    >>> click_histories([mk(0, "u", "a", 1.0, 1), mk(1, "u", "b", 1.0, 1), mk(2, "u", "c", 2.0, 0)], 5)
    [[], [], ['b', 'a']]
    """
    if limit <= 0:
        raise ValueError(f"limit must be > 0, but {limit} is given")
    clicks: dict[str, list[str]] = {}
    pending: list[tuple[str, str]] = []
    pending_time = None
    out = []
    for s in samples:
        t = s.impression.served_at
        if pending_time is not None and t > pending_time:
            for uid, iid in pending:
                clicks.setdefault(uid, []).append(iid)
            pending = []
        seq = clicks.get(s.impression.user_id, [])
        out.append(seq[::-1][:limit] if len(seq) <= limit else seq[: -limit - 1 : -1])
        if s.label:
            pending.append((s.impression.user_id, s.impression.item_id))
        pending_time = t
    return out
