"""Event contracts and manifests shared by every component.

Every record that crosses Kafka or Redis is one of these frozen dataclasses; the
codec in :mod:`em3.codec` turns them into versioned JSON bytes and back.
Times are event times in float seconds since the Unix epoch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "Impression",
    "Click",
    "Sample",
    "ItemContent",
    "SnapshotManifest",
    "sample_id_for",
]


@dataclass(frozen=True)
class Impression:
    """One item shown to one user in one ranked response.

    ``propensity`` is the probability with which the serving policy showed this
    item at this position (1.0 for a deterministic ranker); off-policy
    estimators need it. ``context`` holds categorical context features
    (for example ``{"device": "ios"}``), string to string.
    """

    impression_id: str
    request_id: str
    user_id: str
    item_id: str
    position: int
    served_at: float
    model_line: str = ""
    model_version: int = 0
    arm: str = ""
    propensity: float = 1.0
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Click:
    """A click on a previously served impression."""

    impression_id: str
    user_id: str
    item_id: str
    clicked_at: float


def sample_id_for(impression_id: str, correction: bool) -> str:
    """Stable id of the sample that labels ``impression_id``.

    The same impression always yields the same id for its first label and a
    different (but equally stable) id for its correction, so consumers can drop
    redelivered duplicates by id.

    >>> sample_id_for("imp-1", False) == sample_id_for("imp-1", False)
    True
    >>> sample_id_for("imp-1", False) != sample_id_for("imp-1", True)
    True
    """
    tag = "c" if correction else "l"
    digest = hashlib.blake2b(f"{impression_id}|{tag}".encode(), digest_size=12)
    return digest.hexdigest()


@dataclass(frozen=True)
class Sample:
    """A labelled training example produced by the stream join.

    ``correction`` marks a positive that arrives after a negative for the same
    impression was already emitted (fake-negative correction, Ktena et al. 2019).
    """

    impression: Impression
    label: int
    label_time: float
    correction: bool = False
    sample_id: str = ""

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, but {self.label!r} is given")
        if not self.sample_id:
            object.__setattr__(
                self, "sample_id", sample_id_for(self.impression.impression_id, self.correction)
            )


@dataclass(frozen=True)
class ItemContent:
    """The content of one item: text, an image (bytes or a reference), attributes.

    ``image`` holds encoded image bytes (PNG or JPEG); ``image_ref`` a path or URL
    that a content store resolves. Either may be absent: the model masks a
    missing modality.
    """

    item_id: str
    text: str = ""
    image: bytes | None = None
    image_ref: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotManifest:
    """Describes one published snapshot; saved as JSON beside its safetensors blob.

    ``offsets`` maps ``"topic:partition"`` to the next offset to consume, i.e. the
    snapshot includes every record below it. ``config`` is the saved model config
    (no device, URLs or credentials). ``sha256`` is the hex digest of the
    safetensors bytes.
    """

    model_line: str
    version: int
    parent_version: int | None
    created_at: float
    config: Mapping[str, Any]
    offsets: Mapping[str, int]
    sha256: str
    num_bytes: int
    format: str = "safetensors"
    stats: Mapping[str, Any] = field(default_factory=dict)
