"""One exception class per kind of failure, plus the project warning class."""
from __future__ import annotations

__all__ = [
    "EM3Error",
    "ImproperlyConfigured",
    "DecodeError",
    "SnapshotError",
    "SignatureError",
    "ServiceError",
    "EM3Warning",
]


class EM3Error(Exception):
    """Base class of every error this project raises on purpose."""


class ImproperlyConfigured(EM3Error, ValueError):
    """A setting is missing or invalid."""


class DecodeError(EM3Error, ValueError):
    """A record could not be decoded; ``reason`` is a short machine-readable code.

    Reasons: ``bad_bytes``, ``bad_json``, ``not_an_object``, ``missing_version``,
    ``unknown_schema_version``, ``wrong_type``, ``missing_field``,
    ``mistyped_field``, ``bad_value``, ``absurd_timestamp``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SnapshotError(EM3Error):
    """A snapshot is missing, corrupt (checksum) or does not fit the model config."""


class SignatureError(SnapshotError):
    """A snapshot manifest is unsigned, or not signed with this process's snapshot key."""


class ServiceError(EM3Error):
    """A local service (broker, Redis, Ray) could not be started or reached."""


class EM3Warning(UserWarning):
    """Warnings raised by em3-stream."""
