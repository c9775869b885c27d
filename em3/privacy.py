"""User data rights, the pure core: pseudonymous IDs, tombstones, retention periods.

Pseudonymous IDs at the edge
----------------------------
Every component that takes a raw user ID from outside (the ranking server, log
replay, the simulators' Kafka sink) replaces it with its *pseudonym* before
anything is logged, produced or stored: ``HMAC-SHA256(key, raw)``, hex, cut to
32 characters (128 bits). The key (``EM3_USER_ID_KEY``) stays with the edge;
Kafka, Redis and snapshots only ever see pseudonyms, and without the key a
pseudonym cannot be tied back to a raw ID, nor can a raw ID be looked up by
hashing guesses. Without a key the edge refuses to start, unless raw IDs are
explicitly allowed (``EM3_ALLOW_RAW_USER_IDS=1``, local demos only): then IDs
pass through unchanged.

Key rotation: a new key gives every user a new pseudonym. During a rotation the
edge holds the previous key too (``EM3_USER_ID_KEY_PREVIOUS``): servers move a
user's history to the new pseudonym the first time they see the user, and a
deletion erases both pseudonyms. Learned ID rows of the old pseudonyms are not
moved (learners never see raw IDs); they are re-learned, and the A/B buckets
(a hash of the pseudonym) are reshuffled.

Tombstones
----------
A deletion request names the pseudonym; everything recorded about the deletion
itself is stored under :func:`tombstone_id`, a one-way digest of the pseudonym,
so a tombstone does not name the user: only someone who already holds the
pseudonym (the join, the learners, reading events) can match it. The
:class:`em3.types.Tombstone` record moves ``requested -> erasing ->
stores_erased -> complete``; :func:`settle` is the rule for the last step.

>>> p = Pseudonymizer("k")
>>> p("alice") == pseudonym("k", "alice") and is_pseudonym(p("alice")) and p("alice") != p("bob")
True
>>> Pseudonymizer("", allow_raw=True)("alice")
'alice'
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import msgspec

from em3.errors import ImproperlyConfigured
from em3.types import DeletionRequest, Tombstone

__all__ = [
    "PSEUDONYM_CHARS",
    "pseudonym",
    "is_pseudonym",
    "tombstone_id",
    "Pseudonymizer",
    "RetentionConfig",
    "start",
    "erasing",
    "stores_erased",
    "settle",
    "new_user_id_key",
    "TombstoneFilter",
    "deletion_records",
]

#: Hex characters of a pseudonym (128 bits: no collision among 10^12 users in practice).
PSEUDONYM_CHARS = 32
_PSEUDONYM = re.compile(r"^[0-9a-f]{32}$")
_TOMBSTONE_SALT = b"em3-tombstone\x1f"


def pseudonym(key: str | bytes, raw: str) -> str:
    """The pseudonym of raw user ID ``raw``: HMAC-SHA256 with ``key``, 32 hex characters.

    >>> pseudonym("k", "alice")
    'ec631a55bb81f5b9dc96aa930a45628d'
    """
    if not key:
        raise ImproperlyConfigured("a pseudonym needs a non-empty key (EM3_USER_ID_KEY)")
    k = key.encode() if isinstance(key, str) else key
    return hmac.new(k, raw.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:PSEUDONYM_CHARS]


def is_pseudonym(value: object) -> bool:
    """Whether ``value`` has the shape of a pseudonym (32 lowercase hex characters).

    >>> is_pseudonym("ec631a55bb81f5b9dc96aa930a45628d"), is_pseudonym("u42")
    (True, False)
    """
    return isinstance(value, str) and _PSEUDONYM.match(value) is not None


def tombstone_id(user_pseudonym: str) -> str:
    """The one-way digest a deletion is recorded under (SHA-256, 32 hex characters).

    It names no user: it can be matched only by someone holding the pseudonym.

    >>> tombstone_id("ec631a55bb81f5b9dc96aa930a45628d") != "ec631a55bb81f5b9dc96aa930a45628d"
    True
    """
    return hashlib.sha256(_TOMBSTONE_SALT + user_pseudonym.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def new_user_id_key() -> str:
    """A fresh random key for :class:`Pseudonymizer` (URL-safe, 256 bits)."""
    import secrets

    return secrets.token_urlsafe(32)


class Pseudonymizer:
    """Replaces raw user IDs by their pseudonyms at the edge.

    Parameters
    ----------
    key : str
        The HMAC key (``EM3_USER_ID_KEY``). Empty: refused, unless ``allow_raw``.
    previous_key : str
        The key before the last rotation (``EM3_USER_ID_KEY_PREVIOUS``), or empty.
    allow_raw : bool
        Without a key, let raw IDs through unchanged (``EM3_ALLOW_RAW_USER_IDS=1``;
        local demos only). Ignored when a key is given.

    Raises
    ------
    ImproperlyConfigured
        No key and raw IDs not allowed.
    """

    def __init__(self, key: str = "", previous_key: str = "", allow_raw: bool = False) -> None:
        if not key and not allow_raw:
            raise ImproperlyConfigured(
                "no user ID key: set EM3_USER_ID_KEY (raw user IDs must not reach Kafka, Redis or "
                "snapshots; `em3 services up` generates one), or EM3_ALLOW_RAW_USER_IDS=1 for a local demo"
            )
        if previous_key and not key:
            raise ImproperlyConfigured("EM3_USER_ID_KEY_PREVIOUS is set without EM3_USER_ID_KEY")
        self._key = key.encode() if key else b""
        self._previous = previous_key.encode() if previous_key else b""
        # Users repeat: a bounded memo of this process's recent raw IDs (the edge holds
        # them anyway) spares an HMAC per event in a replay of 10^5 events/s.
        self._memo: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: object) -> "Pseudonymizer":
        """From :class:`em3.config.Settings` (``user_id_key``, ``user_id_key_previous``,
        ``allow_raw_user_ids``)."""
        return cls(getattr(settings, "user_id_key", ""), getattr(settings, "user_id_key_previous", ""),
                   bool(getattr(settings, "allow_raw_user_ids", False)))

    @property
    def keyed(self) -> bool:
        """True when IDs are pseudonymised (False: raw IDs pass, a local demo)."""
        return bool(self._key)

    @property
    def rotating(self) -> bool:
        """True while a previous key is held (a rotation in progress)."""
        return bool(self._previous)

    def __call__(self, raw: str) -> str:
        """The pseudonym of ``raw`` under the current key (``raw`` itself when unkeyed)."""
        if not self._key:
            return raw
        out = self._memo.get(raw)
        if out is None:
            if len(self._memo) >= 100_000:
                self._memo.clear()
            out = self._memo[raw] = pseudonym(self._key, raw)
        return out

    def previous(self, raw: str) -> str | None:
        """The pseudonym of ``raw`` under the previous key, or None outside a rotation."""
        return pseudonym(self._previous, raw) if self._previous else None

    def all(self, raw: str) -> list[str]:
        """Every pseudonym ``raw`` may be stored under now: current, then previous.

        >>> len(Pseudonymizer("new", "old").all("alice")), len(Pseudonymizer("new").all("alice"))
        (2, 1)
        """
        old = self.previous(raw)
        return [self(raw)] + ([old] if old is not None else [])

    def __repr__(self) -> str:
        return f"Pseudonymizer(keyed={bool(getattr(self, '_key', b''))}, rotating={bool(getattr(self, '_previous', b''))})"


_DAY = 86_400.0


@dataclass(frozen=True)
class RetentionConfig:
    """How long each store keeps what it holds; the stores enforce it.

    Read from the environment by :func:`em3.config.load_settings`
    (``EM3_RETENTION_<FIELD>``, seconds; ``0`` keeps forever). Every component
    of a deployment must use the same values.

    Parameters
    ----------
    history_ttl_s : float or None
        A user's click history (``{p}hist:{user}``) expires this long after the
        user's last click (Redis ``EXPIRE``, renewed by each append).
    join_state_ttl_s : float or None
        A join partition's state keys expire this long after its last checkpoint
        (an abandoned join group disappears); a live partition checkpoints at every
        watermark move. Inside it, records already leave at their correction horizon.
    counter_ttl_s : float or None
        Popularity counters (``{p}pop:{kind}``) count the events of about this long
        (``counter_buckets`` time buckets, each expiring on its own); None: one
        counter that never expires.
    counter_buckets : int
        Buckets the counter period is cut into (the window slides by one bucket).
    snapshot_max_age_s : float or None
        Snapshot versions older than this are deleted, except those the line's
        pointer needs (its version and the bases of its delta chain), on top of
        keeping only the newest ``keep`` versions.
    tombstone_ttl_s : float
        How long a tombstone lives: while it does, the join and the learners drop
        events of the deleted user still in flight or replayed. Must outlast the
        topics' retention, so that no retained event outlives its tombstone.
    topic_retention_s : float or None
        ``retention.ms`` of the event topics ``em3 topics create`` makes (Apache
        Kafka enforces it; the embedded Tansu 0.6 stores it and does not).
    """

    history_ttl_s: float | None = 30 * _DAY
    join_state_ttl_s: float | None = 7 * _DAY
    counter_ttl_s: float | None = 30 * _DAY
    counter_buckets: int = 6
    snapshot_max_age_s: float | None = 7 * _DAY
    tombstone_ttl_s: float = 30 * _DAY
    topic_retention_s: float | None = 7 * _DAY

    def __post_init__(self) -> None:
        for name in ("history_ttl_s", "join_state_ttl_s", "counter_ttl_s", "snapshot_max_age_s",
                     "topic_retention_s"):
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise ValueError(f"{name} must be >= 1 s or None (keep), but {value!r} is given")
        if not self.tombstone_ttl_s >= 1:
            raise ValueError(f"tombstone_ttl_s must be >= 1 s, but {self.tombstone_ttl_s!r} is given")
        if not isinstance(self.counter_buckets, int) or self.counter_buckets < 1:
            raise ValueError(f"counter_buckets must be an int >= 1, but {self.counter_buckets!r} is given")
        if self.topic_retention_s is not None and self.tombstone_ttl_s < self.topic_retention_s:
            raise ValueError(
                f"tombstone_ttl_s must be >= topic_retention_s (a retained event of a deleted user must not "
                f"outlive its tombstone), but {self.tombstone_ttl_s!r} < {self.topic_retention_s!r} is given"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "RetentionConfig":
        """From ``EM3_RETENTION_<FIELD>`` variables (seconds; ``0`` or ``none`` keeps forever).

        >>> RetentionConfig.from_env({"EM3_RETENTION_HISTORY_TTL_S": "3600"}).history_ttl_s
        3600.0
        >>> RetentionConfig.from_env({"EM3_RETENTION_HISTORY_TTL_S": "0"}).history_ttl_s is None
        True
        """
        kwargs: dict[str, object] = {}
        for name in cls.__dataclass_fields__:
            raw = env.get(f"EM3_RETENTION_{name.upper()}")
            if raw is None or raw == "":
                continue
            if name == "counter_buckets":
                kwargs[name] = int(raw)
            elif raw.strip().lower() in ("0", "none", "forever"):
                if name == "tombstone_ttl_s":
                    raise ImproperlyConfigured("EM3_RETENTION_TOMBSTONE_TTL_S must be a number of seconds")
                kwargs[name] = None
            else:
                try:
                    kwargs[name] = float(raw)
                except ValueError:
                    raise ImproperlyConfigured(
                        f"EM3_RETENTION_{name.upper()} must be seconds, but {raw!r} is given") from None
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ImproperlyConfigured(str(exc)) from None


def deletion_records(pseudonyms: Iterable[str], requested_at: float,
                     request_id: str = "") -> list[tuple[bytes, bytes, Tombstone]]:
    """What a deletion writes: per pseudonym, the deletions topic's key (the tombstone
    id) and value (the encoded :class:`DeletionRequest`), and the ``requested``
    tombstone to record at once.

    >>> [(len(k), v[:19]) for k, v, _ in deletion_records(["ab"], 1.7e9)]
    [(32, b'{"type":"deletion",')]
    """
    from em3 import codec

    out = []
    for p in pseudonyms:
        tid = tombstone_id(p)
        out.append((tid.encode(), codec.encode(DeletionRequest(p, requested_at, request_id)),
                    Tombstone(tid, requested_at)))
    return out


# -- the tombstone's life -------------------------------------------------------------


def start(existing: Tombstone | None, tid: str, requested_at: float) -> Tombstone | None:
    """The tombstone a deletion request at ``requested_at`` begins, or None when it
    is a redelivery of one already complete (a request made after the last
    completion starts over: the user came back and asked again).

    >>> t = start(None, "0" * 32, 100.0); t.status, t.requested_at
    ('erasing', 100.0)
    >>> done = settle(stores_erased(t, 101.0, {}, []), {})
    >>> start(done, "0" * 32, 100.0) is None, start(done, "0" * 32, 200.0).requested_at
    (True, 200.0)
    """
    if existing is None or existing.status == "requested":
        first = requested_at if existing is None else min(existing.requested_at, requested_at)
        return Tombstone(tid, first, status="erasing")
    if existing.status == "complete":
        if existing.completed_at is not None and requested_at <= existing.completed_at:
            return None
        return Tombstone(tid, requested_at, status="erasing")
    return erasing(existing)


def erasing(tomb: Tombstone) -> Tombstone:
    """The agent took the request (a completed tombstone stays complete).

    >>> t = erasing(Tombstone("0" * 32, 1.7e9)); t.status
    'erasing'
    """
    if tomb.status in ("stores_erased", "complete"):
        return tomb
    return msgspec.structs.replace(tomb, status="erasing")


def stores_erased(tomb: Tombstone, at: float, counts: Mapping[str, int], lines: Iterable[str]) -> Tombstone:
    """History and join state are gone from the stores at ``at``; the model lines in
    ``lines`` must now reset the user's rows (a repeated erasure keeps the first time
    and adds up the counts).

    >>> t = stores_erased(Tombstone("0" * 32, 1.7e9), 1.7e9 + 1, {"history_keys": 1}, ["em3"])
    >>> t.status, t.stores_erased_at, t.lines_expected
    ('stores_erased', 1700000001.0, ['em3'])
    """
    erased = dict(tomb.erased)
    for name, n in counts.items():
        erased[name] = erased.get(name, 0) + int(n)
    if tomb.status == "complete":
        return msgspec.structs.replace(tomb, erased=erased)
    first = tomb.stores_erased_at if tomb.stores_erased_at is not None else at
    expected = sorted(set(tomb.lines_expected) | set(lines))
    return msgspec.structs.replace(tomb, status="stores_erased", stores_erased_at=first,
                                   lines_expected=expected, erased=erased)


def settle(tomb: Tombstone, resets: Mapping[str, tuple[int, float]],
           active: Iterable[str] | None = None) -> Tombstone:
    """Fold the lines' resets (``line -> (version, time)``) into ``tomb``; complete it
    once the stores are erased and every expected line has reset. ``completed_at``
    is when the last of those happened (not when this runs). With ``active``, an
    expected line that is no longer active (its learner stopped publishing) is not
    waited for: its kept snapshots keep the rows until they age out.

    >>> t = stores_erased(Tombstone("0" * 32, 100.0), 101.0, {}, ["a", "b"])
    >>> settle(t, {"a": (7, 102.0)}).status
    'stores_erased'
    >>> done = settle(t, {"a": (7, 102.0), "b": (3, 104.5)})
    >>> done.status, done.completed_at, done.lines_reset
    ('complete', 104.5, {'a': 7, 'b': 3})
    >>> settle(t, {"a": (7, 102.0)}, active=["a"]).status
    'complete'
    """
    if tomb.status == "complete":
        return tomb
    reset = {**tomb.lines_reset, **{line: int(v) for line, (v, _) in resets.items()}}
    if active is not None:
        live = set(active)
        gone = [line for line in tomb.lines_expected if line not in live and line not in reset]
        if gone:
            tomb = msgspec.structs.replace(tomb, lines_expected=[x for x in tomb.lines_expected if x not in gone],
                                           erased={**tomb.erased, "lines_not_waited_for": len(gone)})
    if tomb.status != "stores_erased" or tomb.stores_erased_at is None:
        return msgspec.structs.replace(tomb, lines_reset=reset)
    if any(line not in reset for line in tomb.lines_expected):
        return msgspec.structs.replace(tomb, lines_reset=reset)
    times = [tomb.stores_erased_at] + [t for line, (_, t) in resets.items() if line in tomb.lines_expected]
    return msgspec.structs.replace(tomb, status="complete", lines_reset=reset, completed_at=max(times))


class TombstoneFilter:
    """Answers "is this pseudonym erased?" for the join and the learners, from a
    store's tombstone ids, refetched only when the store's change counter moved.

    ``fetch(seq)`` returns None when the counter still equals ``seq``, else
    ``(new seq, tombstone ids)``. Answers are memoised per pseudonym until the
    set changes (one SHA-256 per distinct user, not per event).

    >>> tids = {tombstone_id("aa")}
    >>> f = TombstoneFilter(lambda seq: None if seq == 1 else (1, tids))
    >>> f.refresh(), f.erased("aa"), f.erased("bb"), len(f)
    (True, True, False, 1)
    """

    def __init__(self, fetch: Callable[[int | None], tuple[int, set[str]] | None], memo_size: int = 1 << 20) -> None:
        self._fetch = fetch
        self._seq: int | None = None
        self._tids: frozenset[str] = frozenset()
        self._memo: dict[str, bool] = {}
        self._memo_size = memo_size

    def refresh(self) -> bool:
        """Refetch if the store changed; True when the set changed."""
        got = self._fetch(self._seq)
        if got is None:
            return False
        self._seq, tids = got
        tids = frozenset(tids)
        changed = tids != self._tids
        self._tids = tids
        if changed:
            self._memo.clear()
        return changed

    def add(self, pseudonyms: Iterable[str]) -> None:
        """Treat ``pseudonyms`` as erased from now on (known before the store says so)."""
        self._tids = self._tids | {tombstone_id(p) for p in pseudonyms}
        self._memo.clear()

    def erased(self, user_pseudonym: str) -> bool:
        if not self._tids:
            return False
        hit = self._memo.get(user_pseudonym)
        if hit is None:
            if len(self._memo) >= self._memo_size:
                self._memo.clear()
            hit = self._memo[user_pseudonym] = tombstone_id(user_pseudonym) in self._tids
        return hit

    def __len__(self) -> int:
        return len(self._tids)
