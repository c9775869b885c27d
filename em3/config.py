"""Connection settings and topic names, one frozen dataclass per concern.

The environment is read in exactly one place, :func:`load_settings`, never at
import time. Command-line flags override the environment, which overrides the
embedded defaults (local Tansu broker and Redis started by ``em3 services up``).

Environment variables
---------------------
``EM3_BOOTSTRAP_SERVERS``  Kafka bootstrap servers, e.g. ``broker:9092``.
``EM3_REDIS_URL``          Redis URL, e.g. ``redis://:password@host:6379/0`` or ``rediss://`` for TLS.
``EM3_TOPIC_PREFIX``       Prefix of every topic name (default ``em3.``).
``EM3_KAFKA_<KEY>``        Any librdkafka property, ``_`` for ``.``: ``EM3_KAFKA_SECURITY_PROTOCOL=SASL_SSL``,
                           ``EM3_KAFKA_SASL_MECHANISM=PLAIN``, ``EM3_KAFKA_SASL_USERNAME=...`` and so on.
``EM3_RUN_DIR``            Where ``em3 services`` keeps pid files, logs and the services file.
``EM3_API_KEY``            Key the HTTP server's write endpoints require (default: the services file's).
``EM3_SNAPSHOT_KEY``       HMAC key of snapshot manifests, shared by learners and servers
                           (default: the services file's).

Secrets never show in a ``repr``: the keys are left out, and a password in a
Redis URL is masked.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from em3.errors import ImproperlyConfigured

__all__ = [
    "KafkaSettings",
    "RedisSettings",
    "TopicNames",
    "Settings",
    "load_settings",
    "default_run_dir",
    "redact_url",
]


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (safe to log or print).

    >>> redact_url("redis://:s3cret@127.0.0.1:6379/0")
    'redis://:***@127.0.0.1:6379/0'
    >>> redact_url("rediss://user:pw@host/1"), redact_url("redis://host:6379/0")
    ('rediss://user:***@host/1', 'redis://host:6379/0')
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    if not password:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


_SECRET_WORDS = ("password", "secret", "token", "key")


def default_run_dir() -> Path:
    """``$EM3_RUN_DIR`` if set, else ``./runs/services``."""
    return Path(os.environ.get("EM3_RUN_DIR", "runs/services")).resolve()


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach Kafka.

    ``extra`` holds librdkafka properties passed through unchanged to every
    producer, consumer and admin client (SASL/SSL settings live there).
    """

    bootstrap_servers: str
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.bootstrap_servers or not isinstance(self.bootstrap_servers, str):
            raise ImproperlyConfigured(
                f"bootstrap_servers must be a non-empty 'host:port[,host:port]' string, "
                f"but {self.bootstrap_servers!r} is given"
            )

    def __repr__(self) -> str:
        extra = {k: "***" if any(w in k.lower() for w in _SECRET_WORDS) else v for k, v in self.extra.items()}
        return f"KafkaSettings(bootstrap_servers={self.bootstrap_servers!r}, extra={extra!r})"

    def client_config(self, **overrides: object) -> dict[str, object]:
        """A librdkafka config dict: bootstrap servers, pass-through extras, then overrides."""
        config: dict[str, object] = {"bootstrap.servers": self.bootstrap_servers}
        config.update(self.extra)
        config.update(overrides)
        return config


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis: a URL (``redis://`` or ``rediss://`` for TLS, auth in the URL)
    plus optional TLS files."""

    url: str
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ImproperlyConfigured(
                f"redis url must start with redis://, rediss:// or unix://, but {redact_url(self.url)!r} is given"
            )

    def __repr__(self) -> str:
        """The URL with its password masked.

        >>> RedisSettings("redis://:pw@127.0.0.1:6379/0")
        RedisSettings(url='redis://:***@127.0.0.1:6379/0', ssl_ca_certs=None, ssl_certfile=None, ssl_keyfile=None)
        """
        return (f"RedisSettings(url={redact_url(self.url)!r}, ssl_ca_certs={self.ssl_ca_certs!r}, "
                f"ssl_certfile={self.ssl_certfile!r}, ssl_keyfile={self.ssl_keyfile!r})")


@dataclass(frozen=True)
class TopicNames:
    """Topic names, all sharing one prefix.

    >>> TopicNames("x.").samples
    'x.samples'
    """

    prefix: str = "em3."

    @property
    def impressions(self) -> str:
        return f"{self.prefix}impressions"

    @property
    def clicks(self) -> str:
        return f"{self.prefix}clicks"

    @property
    def conversions(self) -> str:
        """Conversions (purchases after a click), co-partitioned with impressions and clicks."""
        return f"{self.prefix}conversions"

    @property
    def samples(self) -> str:
        return f"{self.prefix}samples"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead-letter"

    def all(self) -> list[str]:
        return [self.impressions, self.clicks, self.conversions, self.samples, self.dead_letter]


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to find the shared infrastructure.

    ``api_key`` is what the HTTP server's write endpoints require and
    ``snapshot_key`` the HMAC key of snapshot manifests; both are left out of
    ``repr``.
    """

    kafka: KafkaSettings
    redis: RedisSettings
    topics: TopicNames = TopicNames()
    redis_prefix: str = "em3:"
    api_key: str = field(default="", repr=False)
    snapshot_key: str = field(default="", repr=False)

    def with_overrides(
        self,
        bootstrap_servers: str | None = None,
        redis_url: str | None = None,
        topic_prefix: str | None = None,
    ) -> "Settings":
        s = self
        if bootstrap_servers:
            s = replace(s, kafka=replace(s.kafka, bootstrap_servers=bootstrap_servers))
        if redis_url:
            s = replace(s, redis=replace(s.redis, url=redis_url))
        if topic_prefix is not None:
            s = replace(s, topics=TopicNames(topic_prefix))
        return s


def _services_file(run_dir: Path) -> Mapping[str, str]:
    path = run_dir / "services.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return {}
    return {}


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    bootstrap_servers: str | None = None,
    redis_url: str | None = None,
    topic_prefix: str | None = None,
    kafka_options: Mapping[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from flags, then the environment, then the services file
    that ``em3 services up`` writes, then loopback defaults (no keys).

    >>> s = load_settings({"EM3_KAFKA_SASL_MECHANISM": "PLAIN"}, bootstrap_servers="b:9092",
    ...                   kafka_options={"security.protocol": "SASL_SSL"})
    >>> s.kafka.client_config()["bootstrap.servers"], s.kafka.extra["sasl.mechanism"], s.kafka.extra["security.protocol"]
    ('b:9092', 'PLAIN', 'SASL_SSL')
    """
    env = os.environ if env is None else env
    run_dir = Path(env.get("EM3_RUN_DIR", "runs/services")).resolve()
    local = _services_file(run_dir)
    bootstrap = (
        bootstrap_servers
        or env.get("EM3_BOOTSTRAP_SERVERS")
        or local.get("bootstrap_servers")
        or "127.0.0.1:9092"
    )
    url = redis_url or env.get("EM3_REDIS_URL") or local.get("redis_url") or "redis://127.0.0.1:6379/0"
    extra = {
        key[len("EM3_KAFKA_"):].lower().replace("_", "."): value
        for key, value in env.items()
        if key.startswith("EM3_KAFKA_")
    }
    extra.update(kafka_options or {})
    prefix = topic_prefix if topic_prefix is not None else env.get("EM3_TOPIC_PREFIX", "em3.")
    return Settings(
        kafka=KafkaSettings(bootstrap, extra),
        redis=RedisSettings(
            url,
            ssl_ca_certs=env.get("EM3_REDIS_SSL_CA_CERTS"),
            ssl_certfile=env.get("EM3_REDIS_SSL_CERTFILE"),
            ssl_keyfile=env.get("EM3_REDIS_SSL_KEYFILE"),
        ),
        topics=TopicNames(prefix),
        api_key=env.get("EM3_API_KEY") or str(local.get("api_key") or ""),
        snapshot_key=env.get("EM3_SNAPSHOT_KEY") or str(local.get("snapshot_key") or ""),
    )
