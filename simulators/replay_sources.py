"""Adapters that turn logs into :class:`simulators.replay.LogRow` for the replayer.

Built in: the Open Bandit Dataset sample (:func:`obd_rows`), MovieLens-100K
(:func:`movielens_rows`) and files in JSONL, CSV or Parquet (:func:`file_rows`). A row that cannot be parsed becomes a
:class:`simulators.replay.Malformed` with a reason, so the replayer counts it.

File column schema
------------------
One row per impression (one item shown at one position).

================  ========  ==============================================================
column            required  meaning
================  ========  ==============================================================
``user_id``       yes       user id (string; numbers are converted)
``item_id``       yes       item id (string; numbers are converted)
``served_at``     yes       event time: seconds since the epoch, or ISO 8601 with zone
``impression_id`` no        default ``"{source}-{row number}"``
``request_id``    no        default: the impression id
``position``      no        0-based position in the ranked list, default 0
``propensity``    no        logging policy's probability of this item here, default 1.0
``model_line``    no        string
``model_version`` no        integer, default 0
``arm``           no        string
``clicked``       no        0/1 or true/false
``clicked_at``    no        click time (as ``served_at``); sets the delay
``click_delay_s`` no        seconds from impression to click (used when no ``clicked_at``)
``context``       no        JSON object (string to string), in JSONL also a nested object
``ctx_<name>``    no        one context entry each (``ctx_device=ios``)
================  ========  ==============================================================

A row is a click when it has ``clicked_at`` or ``click_delay_s``, or when
``clicked`` is true; a click with no time gets a delay from ``default_delay``
(seeded), 0 s by default. Empty CSV cells count as missing.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from em3.types import Impression
from simulators.delays import DelayDistribution, FixedDelay, LogNormalDelay
from simulators.obd import load_obd
from simulators.replay import LogRow, Malformed

__all__ = [
    "FILE_FORMATS",
    "obd_rows",
    "movielens_rows",
    "obd_user_id",
    "file_rows",
    "record_to_row",
    "row_to_record",
]

logger = logging.getLogger(__name__)

FILE_FORMATS = ("jsonl", "csv", "parquet")
_MISSING = ("", None)


def obd_user_id(features: np.ndarray) -> str:
    """A stable user id for OBD, which has none: a hash of the four user features."""
    digest = hashlib.blake2b("|".join(str(f) for f in features).encode(), digest_size=8)
    return f"obd-u{digest.hexdigest()}"


def obd_rows(
    campaign: str = "all", policy: str = "random", *, click_delay: DelayDistribution | None = None,
    seed: int = 0, data_dir: str | Path | None = None,
) -> Iterator[LogRow]:
    """Rows of the Open Bandit Dataset sample, in event-time order.

    OBD logs whether an item was clicked but not when, so each click gets a
    delay drawn from ``click_delay`` (default: log-normal, median 20 s,
    sigma 1.2) with ``numpy.random.default_rng(seed)``: the same seed gives
    the same delays. User ids hash the four user features (:func:`obd_user_id`);
    ``propensity`` is the logged propensity score and ``arm`` the policy.
    """
    log = load_obd(campaign, policy, data_dir)
    delay = click_delay if click_delay is not None else LogNormalDelay()
    rng = np.random.default_rng(seed)
    delays = delay.sample(rng, int(log.reward.sum())).tolist()
    ids: dict[tuple[str, ...], str] = {}
    user_ids = []
    for feats in map(tuple, log.user_features.tolist()):
        uid = ids.get(feats)
        if uid is None:
            uid = ids[feats] = obd_user_id(np.array(feats))
        user_ids.append(uid)
    context = {"campaign": campaign, "source": "obd"}
    model_line = f"obd-{policy}"
    id_prefix = f"obd-{policy}-{campaign}-"
    columns = zip(log.action.tolist(), log.position.tolist(), log.timestamp.tolist(), log.pscore.tolist(),
                  log.reward.tolist(), user_ids)
    k = 0
    for i, (action, position, served_at, pscore, reward, user_id) in enumerate(columns):
        impression_id = f"{id_prefix}{i}"
        imp = Impression(impression_id, impression_id, user_id, str(action), position, served_at,
                         model_line, 0, policy, pscore, context)
        if reward:
            yield LogRow(imp, delays[k])
            k += 1
        else:
            yield LogRow(imp)


def movielens_rows(
    *, shift_to: float | None = 1_704_067_200.0, click_delay: DelayDistribution | None = None, seed: int = 0,
    max_events: int | None = None, path: str | Path | None = None,
) -> Iterator[LogRow]:
    """Rows of MovieLens-100K as read by :func:`em3.data.movielens.load_ml100k`.

    Each rating is an impression at its rating time; a rating >= 4 is a click
    (the mapping of :mod:`em3.data.movielens`). The ratings date from
    1997-98, which the codec rejects as implausible, so all times are shifted
    by one constant so that the first event falls at ``shift_to`` (default
    2024-01-01 UTC; ``None`` keeps the original times). Clicks get a delay from
    ``click_delay`` (default 0 s) drawn with ``numpy.random.default_rng(seed)``.
    """
    from em3.data.movielens import load_ml100k

    ml = load_ml100k(path, images=False, max_events=max_events)
    delay = click_delay if click_delay is not None else FixedDelay(0.0)
    rng = np.random.default_rng(seed)
    labels = [s.label for s in ml.samples]
    delays = delay.sample(rng, int(sum(labels))).tolist()
    offset = 0.0 if shift_to is None or not ml.samples else shift_to - ml.samples[0].impression.served_at
    k = 0
    for sample, label in zip(ml.samples, labels):
        imp = sample.impression
        if offset:
            imp = Impression(imp.impression_id, imp.request_id, imp.user_id, imp.item_id, imp.position,
                             imp.served_at + offset, "movielens", 0, "", imp.propensity, imp.context)
        if label:
            yield LogRow(imp, delays[k])
            k += 1
        else:
            yield LogRow(imp)


# --- files ------------------------------------------------------------------------


def _time(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a time, but {value!r} is given")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone, but {text!r} has none")
    return parsed.timestamp()


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "t", "y"):
            return True
        if v in ("0", "false", "no", "f", "n", ""):
            return False
        raise ValueError(f"clicked must be 0/1 or true/false, but {value!r} is given")
    return bool(value)


def _ident(value: Any, name: str) -> str:
    if value in _MISSING:
        raise KeyError(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _context(record: Mapping[str, Any]) -> dict[str, str]:
    ctx: dict[str, str] = {}
    raw = record.get("context")
    if raw not in _MISSING:
        obj = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(obj, Mapping):
            raise ValueError(f"context must be a JSON object, but {type(obj).__name__} is given")
        ctx.update({str(k): str(v) for k, v in obj.items()})
    for key, value in record.items():
        if key.startswith("ctx_") and value not in _MISSING:
            ctx[key[4:]] = str(value)
    return ctx


def record_to_row(
    record: Mapping[str, Any], index: int, *, source: str = "log",
    default_delay: float = 0.0,
) -> LogRow | Malformed:
    """Parse one record (a dict of the file schema) into a row, or a Malformed."""
    try:
        if record.get("served_at") in _MISSING:
            raise KeyError("served_at")
        served_at = _time(record["served_at"], "served_at")
        impression_id = str(record.get("impression_id") or f"{source}-{index}")
        position = record.get("position")
        propensity = record.get("propensity")
        model_version = record.get("model_version")
        imp = Impression(
            impression_id=impression_id,
            request_id=str(record.get("request_id") or impression_id),
            user_id=_ident(record.get("user_id"), "user_id"),
            item_id=_ident(record.get("item_id"), "item_id"),
            position=0 if position in _MISSING else _int(position, "position"),
            served_at=served_at,
            model_line=str(record.get("model_line") or ""),
            model_version=0 if model_version in _MISSING else _int(model_version, "model_version"),
            arm=str(record.get("arm") or ""),
            propensity=1.0 if propensity in _MISSING else float(propensity),
            context=_context(record),
        )
        delay: float | None = None
        if record.get("clicked_at") not in _MISSING:
            delay = _time(record["clicked_at"], "clicked_at") - served_at
        elif record.get("click_delay_s") not in _MISSING:
            delay = float(record["click_delay_s"])
        elif record.get("clicked") not in _MISSING and _truthy(record["clicked"]):
            delay = default_delay
        if delay is not None and record.get("clicked") not in _MISSING and not _truthy(record["clicked"]):
            delay = None  # an explicit clicked=0 wins over a stray click time
        return LogRow(imp, delay)
    except KeyError as exc:
        return Malformed("missing_field", f"field {exc.args[0]!r} is missing", index)
    except (TypeError, ValueError) as exc:
        return Malformed("bad_value", str(exc), index)


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, but {value!r} is given")
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{name} must be an integer, but {value!r} is given")
    return int(number)


def row_to_record(row: LogRow) -> dict[str, Any]:
    """The file-schema record of a row (inverse of :func:`record_to_row`)."""
    imp = row.impression
    record: dict[str, Any] = {
        "impression_id": imp.impression_id, "request_id": imp.request_id, "user_id": imp.user_id,
        "item_id": imp.item_id, "position": imp.position, "served_at": imp.served_at,
        "propensity": imp.propensity, "model_line": imp.model_line, "model_version": imp.model_version,
        "arm": imp.arm, "clicked": int(row.click_delay_s is not None),
        "click_delay_s": row.click_delay_s, "context": json.dumps(dict(imp.context), sort_keys=True),
    }
    return record


def _detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FILE_FORMATS:
            raise ValueError(f"format must be one of {FILE_FORMATS}, but {fmt!r} is given")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson", "json"):
        return "jsonl"
    if suffix in ("csv", "parquet"):
        return suffix
    raise ValueError(f"cannot tell the format of {path.name!r}; pass format= one of {FILE_FORMATS}")


def _records(path: Path, fmt: str) -> Iterator[tuple[int, Mapping[str, Any] | Malformed]]:
    if fmt == "jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    yield i, Malformed("bad_json", str(exc), i)
                    continue
                yield i, obj if isinstance(obj, Mapping) else Malformed("not_an_object", type(obj).__name__, i)
    elif fmt == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for i, rec in enumerate(csv.DictReader(f), start=2):
                if None in rec:  # more cells than header columns
                    yield i, Malformed("bad_row", "more cells than columns", i)
                    continue
                yield i, rec
    else:
        import pyarrow.parquet as pq  # heavy: only for Parquet

        table = pq.ParquetFile(path)
        i = 0
        for batch in table.iter_batches(batch_size=65_536):
            for rec in batch.to_pylist():
                i += 1
                yield i, rec


def file_rows(
    path: str | Path, *, format: str | None = None, default_delay: DelayDistribution | None = None,
    seed: int = 0,
) -> Iterator[LogRow | Malformed]:
    """Rows of a JSONL, CSV or Parquet log (schema in the module docstring).

    Parameters
    ----------
    path : str or Path
    format : {"jsonl", "csv", "parquet"}, optional
        By default from the file extension.
    default_delay : DelayDistribution, optional
        Delay for clicks with no time (default: 0 s).
    seed : int
        Seed of those delays.
    """
    path = Path(path)
    fmt = _detect_format(path, format)
    delay = default_delay if default_delay is not None else FixedDelay(0.0)
    rng = np.random.default_rng(seed)
    source = path.stem
    for index, rec in _records(path, fmt):
        if isinstance(rec, Malformed):
            yield rec
            continue
        d = float(delay.sample(rng, 1)[0]) if not isinstance(delay, FixedDelay) else delay.delay_s
        yield record_to_row(rec, index, source=source, default_delay=d)
