"""The event schema: every record that crosses Kafka, Redis or HTTP, declared once.

Each event is a :class:`msgspec.Struct` whose field types carry the edge's rules
as constraints (:data:`Id`, :data:`Timestamp`, :data:`Context`, ...). The same
declarations serve three readers:

* the codec (:mod:`em3.codec`) decodes Kafka records and Redis values with them,
  and turns a violated constraint into a dead-letter reason;
* the join's hot path (:mod:`stream.wire`) decodes through the same codec;
* the HTTP layer (:mod:`serving.app`) decodes request bodies into the request
  structs below and answers 422 with the violated field, and publishes their JSON
  schema in ``/openapi.json``.

Constraints apply when bytes are decoded (``msgspec`` does not check them when a
struct is built in Python from values the program made itself). The rules:

* IDs are 1-256 characters of valid Unicode without control characters (a tab in
  an item id once broke the history format) or lone surrogates (JSON allows
  ``"\\ud800"``; UTF-8 does not, and encoding it downstream crashed the join).
* Context maps at most 32 keys of 64 characters to values of 256; item
  attributes 64 keys to values of 1,024; item text at most 20,000 characters and
  an image at most 512 KiB, so one record always fits a Kafka message.
* Event times lie in [2000-01-01, 2100-01-01); the *future* bound relative to the
  reader's clock (``max_future_s``) is checked by the reader, which knows its
  clock.

Every wire record carries ``"type"`` (the struct's tag) and ``"v"`` (the schema
version). Times are event times in float seconds since the Unix epoch.
"""
from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "SCHEMA_VERSION",
    "MIN_TIMESTAMP",
    "MAX_TIMESTAMP",
    "MAX_ID_CHARS",
    "MAX_CONTEXT_ENTRIES",
    "MAX_IMAGE_BYTES",
    "Id",
    "Timestamp",
    "Context",
    "Impression",
    "Click",
    "Conversion",
    "Sample",
    "ItemContent",
    "SnapshotManifest",
    "DeletionRequest",
    "Tombstone",
    "CheckpointManifest",
    "RankRequest",
    "ClickRequest",
    "ConversionRequest",
    "ItemsRequest",
    "sample_id_for",
    "valid_id",
]

SCHEMA_VERSION = 1
#: Event times outside [2000-01-01, 2100-01-01) are rejected as absurd.
MIN_TIMESTAMP = 946_684_800.0
MAX_TIMESTAMP = 4_102_444_800.0

MAX_ID_CHARS = 256
MAX_CONTEXT_ENTRIES = 32
MAX_CONTEXT_KEY_CHARS = 64
MAX_CONTEXT_VALUE_CHARS = 256
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_VALUE_CHARS = 1024
MAX_TEXT_CHARS = 20_000
MAX_IMAGE_BYTES = 512 * 1024
MAX_CANDIDATES = 10_000
MAX_ITEMS_PER_REQUEST = 1000
#: Largest conversion value accepted (an order total, in the deployment's currency).
MAX_CONVERSION_VALUE = 1e9

#: No C0 control character, DEL, or lone surrogate (valid JSON, invalid UTF-8).
_PRINTABLE = r"^[^\x00-\x1f\x7f\ud800-\udfff]+$"

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=_PRINTABLE,
                         description="1-256 characters, no control characters")]
#: An optional label (model line, arm, request id): may be empty, else like :data:`Id`.
Label = Annotated[str, Meta(max_length=MAX_ID_CHARS, pattern=r"^[^\x00-\x1f\x7f\ud800-\udfff]*$")]
Timestamp = Annotated[float, Meta(ge=MIN_TIMESTAMP, lt=MAX_TIMESTAMP,
                                  description="seconds since the Unix epoch, in [2000, 2100)")]
_ContextKey = Annotated[str, Meta(max_length=MAX_CONTEXT_KEY_CHARS, pattern=_PRINTABLE)]
_ContextValue = Annotated[str, Meta(max_length=MAX_CONTEXT_VALUE_CHARS, pattern=r"^[^\ud800-\udfff]*$")]
Context = Annotated[dict[_ContextKey, _ContextValue], Meta(max_length=MAX_CONTEXT_ENTRIES)]
_Attributes = Annotated[
    dict[_ContextKey, Annotated[str, Meta(max_length=MAX_ATTRIBUTE_VALUE_CHARS, pattern=r"^[^\ud800-\udfff]*$")]],
    Meta(max_length=MAX_ATTRIBUTES),
]
_Text = Annotated[str, Meta(max_length=MAX_TEXT_CHARS, pattern=r"^[^\ud800-\udfff]*$")]
_Image = Annotated[bytes, Meta(max_length=MAX_IMAGE_BYTES, description="image bytes, base64 in JSON")]
_ImageRef = Annotated[str, Meta(max_length=2048, pattern=_PRINTABLE)]
Position = Annotated[int, Meta(ge=0, le=MAX_CANDIDATES)]
Propensity = Annotated[float, Meta(gt=0.0, le=1.0)]
ConversionValue = Annotated[float, Meta(ge=0.0, le=MAX_CONVERSION_VALUE,
                                        description="value of the conversion (an order total), >= 0")]
Version = Literal[1]


def valid_id(value: object) -> bool:
    """True when ``value`` obeys the :data:`Id` rules (for IDs read back from a store).

    >>> valid_id("item-7"), valid_id("a\\tb"), valid_id(""), valid_id("\\ud800")
    (True, False, False, False)
    """
    return type(value) is str and 0 < len(value) <= MAX_ID_CHARS and _ID_RE.match(value) is not None


_ID_RE = re.compile(_PRINTABLE)


class Impression(msgspec.Struct, frozen=True, tag="impression", tag_field="type"):
    """One item shown to one user in one ranked response.

    ``propensity`` is the probability with which the serving policy showed this
    item at this position (1.0 for a deterministic ranker); off-policy
    estimators need it. ``context`` holds categorical context features
    (for example ``{"device": "ios"}``), string to string.
    """

    impression_id: Id
    request_id: Label
    user_id: Id
    item_id: Id
    position: Position
    served_at: Timestamp
    model_line: Label = ""
    model_version: Annotated[int, Meta(ge=0)] = 0
    arm: Label = ""
    propensity: Propensity = 1.0
    context: Context = msgspec.field(default_factory=dict)
    v: Version = SCHEMA_VERSION


class Click(msgspec.Struct, frozen=True, tag="click", tag_field="type"):
    """A click on a previously served impression."""

    impression_id: Id
    user_id: Id
    item_id: Id
    clicked_at: Timestamp
    v: Version = SCHEMA_VERSION


class Conversion(msgspec.Struct, frozen=True, tag="conversion", tag_field="type"):
    """A conversion (a purchase, a sign-up) after a click on impression ``impression_id``.

    The impression id is the reference to the click: the join attributes the
    conversion to that impression's click if it falls within the conversion
    window after the click (:class:`stream.join.JoinConfig`). ``value`` (an
    order total, say) is optional; the expected-value serving objective learns
    from it.
    """

    impression_id: Id
    user_id: Id
    item_id: Id
    converted_at: Timestamp
    value: ConversionValue | None = None
    v: Version = SCHEMA_VERSION


def sample_id_for(impression_id: str, correction: bool, conversion: bool = False) -> str:
    """Stable id of the sample that labels ``impression_id``.

    The same impression always yields the same id for its first label, a
    different (but equally stable) id for its click correction, and a third for
    its conversion, so consumers can drop redelivered duplicates by id.

    >>> sample_id_for("imp-1", False) == sample_id_for("imp-1", False)
    True
    >>> len({sample_id_for("imp-1", False), sample_id_for("imp-1", True), sample_id_for("imp-1", True, True)})
    3
    """
    tag = "v" if conversion else ("c" if correction else "l")
    digest = hashlib.blake2b(f"{impression_id}|{tag}".encode(), digest_size=12)
    return digest.hexdigest()


class Sample(msgspec.Struct, tag="sample", tag_field="type"):
    """A labelled training example produced by the stream join.

    Three kinds, each with its own stable ``sample_id``:

    * the first label of an impression (``correction`` False): ``label`` is the
      click; ``conversion`` is 0, because a conversion always travels as its own
      sample (below), so labels never depend on whether a click or its conversion
      was read first;
    * a click correction (``correction`` True, ``conversion`` 0): a click that
      arrived after the negative for the impression was emitted (fake-negative
      correction, Ktena et al. 2019);
    * a conversion (``conversion`` 1, ``label`` 1, ``correction`` True): the
      impression's click converted (``value`` its value, 0 if none was given,
      ``label_time`` the conversion time). It corrects the conversion label of
      the click's sample, which went out before the conversion was known
      (delayed feedback).

    Not frozen only so that ``__post_init__`` can fill ``sample_id``; treat it as
    immutable.
    """

    impression: Impression
    label: int
    label_time: Timestamp
    correction: bool = False
    sample_id: Label = ""
    conversion: int = 0
    value: ConversionValue = 0.0
    v: Version = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.label not in (0, 1) or type(self.label) is bool:
            raise ValueError(f"label must be 0 or 1, but {self.label!r} is given")
        if self.conversion not in (0, 1) or type(self.conversion) is bool:
            raise ValueError(f"conversion must be 0 or 1, but {self.conversion!r} is given")
        if self.conversion and not (self.label == 1 and self.correction):
            raise ValueError("a conversion sample must have label 1 and correction True, but "
                             f"label {self.label!r} and correction {self.correction!r} are given")
        if not self.sample_id:
            self.sample_id = sample_id_for(self.impression.impression_id, self.correction, bool(self.conversion))

    @property
    def is_late_click(self) -> bool:
        """A click correction (not a conversion)."""
        return self.correction and not self.conversion


class ItemContent(msgspec.Struct, frozen=True, tag="item", tag_field="type"):
    """The content of one item: text, an image (bytes or a reference), attributes.

    ``image`` holds encoded image bytes (PNG or JPEG; base64 in JSON); ``image_ref``
    a path or URL that a content store resolves. Either may be absent: the model
    masks a missing modality.
    """

    item_id: Id
    text: _Text = ""
    image: _Image | None = None
    image_ref: _ImageRef | None = None
    attributes: _Attributes = msgspec.field(default_factory=dict)
    v: Version = SCHEMA_VERSION


class SnapshotManifest(msgspec.Struct, frozen=True):
    """Describes one published snapshot; saved as JSON beside its safetensors blob.

    ``offsets`` maps ``"topic:partition"`` to the next offset to consume, i.e. the
    snapshot includes every record below it. ``config`` is the saved model config
    (no device, URLs or credentials). ``sha256`` is the hex digest of the
    safetensors bytes. ``signature`` is the HMAC-SHA256 of the manifest's other
    fields (:func:`em3.snapshot.sign_manifest`), with a key learners and servers
    share; servers refuse a snapshot without a valid one.
    """

    model_line: Id
    version: Annotated[int, Meta(ge=0)]
    parent_version: int | None
    created_at: float
    config: dict[str, Any]
    offsets: dict[str, int]
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    num_bytes: Annotated[int, Meta(ge=0)]
    format: str = "safetensors"
    stats: dict[str, Any] = msgspec.field(default_factory=dict)
    signature: str = ""
    v: Version = SCHEMA_VERSION
    #: ``"full"``: the blob holds the whole trainable state. ``"delta"``: it holds the
    #: rows that changed since ``base_version`` plus every tensor that changed wholly
    #: (:func:`em3.snapshot.pack_delta`).
    kind: Literal["full", "delta"] = "full"
    base_version: int | None = None
    #: Digest of the whole state this snapshot stands for (:func:`em3.snapshot.state_digest`),
    #: and, for a delta, of the state it must be applied to.
    state_sha256: str = ""
    base_state_sha256: str = ""


class DeletionRequest(msgspec.Struct, frozen=True, tag="deletion", tag_field="type"):
    """A request to erase one user, on the compacted ``{prefix}deletions`` topic.

    ``user_id`` is the user's *pseudonym* (:func:`em3.privacy.pseudonym`), never
    the raw ID. The record's key is :func:`em3.privacy.tombstone_id` of it, so
    the completion record that follows (:class:`Tombstone`, without the
    pseudonym) replaces the request when the topic is compacted.
    """

    user_id: Id
    requested_at: Timestamp
    request_id: Label = ""
    v: Version = SCHEMA_VERSION


TombstoneStatus = Literal["requested", "erasing", "stores_erased", "complete"]


class Tombstone(msgspec.Struct, frozen=True, tag="tombstone", tag_field="type"):
    """What is known of one deletion, stored under its ``tombstone_id`` (a one-way
    digest of the pseudonym: the record never names the user).

    ``status`` moves ``requested`` (the server wrote the request) -> ``erasing``
    (the agent took it) -> ``stores_erased`` (history, join state gone from
    Redis; ``stores_erased_at``) -> ``complete`` (every model line in
    ``lines_expected`` published a snapshot with the user's rows reset:
    ``lines_reset`` maps line -> that version; ``completed_at`` is when the last
    of these happened). ``erased`` counts what was removed.
    """

    tombstone_id: Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
    requested_at: Timestamp
    status: TombstoneStatus = "requested"
    stores_erased_at: float | None = None
    lines_expected: list[str] = msgspec.field(default_factory=list)
    lines_reset: dict[str, int] = msgspec.field(default_factory=dict)
    completed_at: float | None = None
    erased: dict[str, int] = msgspec.field(default_factory=dict)
    v: Version = SCHEMA_VERSION


class CheckpointManifest(msgspec.Struct, frozen=True):
    """Describes a learner checkpoint: what a learner needs beyond the snapshot's
    weights to continue training exactly (optimizer moments and step counts, its
    step counter, RNG state, the cache of history items' content embeddings); saved
    as JSON beside its safetensors blob, next to the snapshot it belongs to.

    ``version`` and ``state_sha256`` name that snapshot (its version and the digest
    of the whole state it stands for, full or delta); ``rank`` the learner of a fleet
    (0 alone). ``sha256`` and ``num_bytes`` describe the blob; ``signature`` is the
    HMAC-SHA256 of the other fields with the snapshot key (:mod:`em3.signing`).
    Servers never read checkpoints.
    """

    model_line: Id
    version: Annotated[int, Meta(ge=0)]
    state_sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    num_bytes: Annotated[int, Meta(ge=0)]
    created_at: float
    rank: Annotated[int, Meta(ge=0)] = 0
    format: str = "safetensors"
    signature: str = ""
    v: Version = SCHEMA_VERSION


# --- HTTP request bodies (serving.app decodes them; /openapi.json shows them) --------


class RankRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/rank``: rank ``item_ids`` for ``user_id``.

    ``served_at`` (event time, default now) stamps the impressions, for simulators
    on a virtual clock; it may not lie further ahead of the server's clock than
    its ``max_future_s``. ``explain`` (a JSON boolean; anything else is refused)
    asks for an explanation of each ranked item.
    """

    user_id: Id
    item_ids: Annotated[list[Id], Meta(min_length=1, max_length=MAX_CANDIDATES)]
    context: Context = msgspec.field(default_factory=dict)
    k: Annotated[int, Meta(ge=1)] | None = None
    served_at: Timestamp | None = None
    explain: bool = False

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for n, item_id in enumerate(self.item_ids):
            if item_id in seen:
                raise ValueError(f"item_ids[{n}] = {item_id!r} repeats item_ids[{seen[item_id]}]")
            seen[item_id] = n


class ClickRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/click``: a click on impression ``impression_id`` (``clicked_at``
    defaults to the server's clock)."""

    impression_id: Id
    user_id: Id
    item_id: Id
    clicked_at: Timestamp | None = None


class ConversionRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/conversion``: a conversion after the click on impression
    ``impression_id`` (``converted_at`` defaults to the server's clock; ``value``
    is optional)."""

    impression_id: Id
    user_id: Id
    item_id: Id
    converted_at: Timestamp | None = None
    value: ConversionValue | None = None


class ItemRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One item of ``POST /v1/items`` (an :class:`ItemContent` without the tag)."""

    item_id: Id
    text: _Text = ""
    image: _Image | None = None
    image_ref: _ImageRef | None = None
    attributes: _Attributes = msgspec.field(default_factory=dict)

    def to_content(self) -> ItemContent:
        return ItemContent(self.item_id, self.text, self.image, self.image_ref, dict(self.attributes))


class ItemsRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/items`` with several items."""

    items: Annotated[list[ItemRequest], Meta(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)]
