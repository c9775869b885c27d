"""em3-stream core: event types, codec, configs, errors, stores, the EM3 model and
the snapshot format, shared by ``stream``, ``learners``, ``serving`` and
``simulators`` (which never import each other's internals)."""
from em3.types import Click, Impression, ItemContent, Sample, SnapshotManifest

__all__ = ["Click", "Impression", "ItemContent", "Sample", "SnapshotManifest", "__version__"]
__version__ = "0.1.0"
