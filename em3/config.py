"""Connection settings and topic names, and the one loader that fills them.

The environment is read in exactly one place, :func:`load_settings` (through
pydantic-settings, never at import time): explicit arguments (the command-line
flags) override the ``EM3_*`` environment, which overrides the services file that
``em3 services up`` writes, which overrides loopback defaults. :class:`EnvSettings`
declares every variable (the config reference in README.md lists them); an empty
variable counts as unset.

Secrets never show in a ``repr``: the keys are left out, and a password in a
Redis URL is masked.
"""
from __future__ import annotations

import json
import os
from dataclasses import field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field as _Field
from pydantic import ValidationError
from pydantic_settings import (BaseSettings, EnvSettingsSource, InitSettingsSource, PydanticBaseSettingsSource,
                               SettingsConfigDict)

from em3.constraints import Annotated, NonEmptyStr, StringConstraints, config_class, explain
from em3.errors import ImproperlyConfigured
from em3.privacy import RetentionConfig

__all__ = [
    "KafkaSettings",
    "RedisSettings",
    "TopicNames",
    "Settings",
    "EnvSettings",
    "load_settings",
    "default_run_dir",
    "redact_url",
]

#: A Redis URL: ``redis://``, ``rediss://`` (TLS) or ``unix://``.
RedisUrl = Annotated[str, StringConstraints(pattern=r"^(redis|rediss|unix)://")]


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


def default_run_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$EM3_RUN_DIR`` if set, else ``./runs/services`` (read by the same loader, without
    checking the other variables)."""
    run_dir = _Environment(EnvSettings, env)().get("run_dir") or EnvSettings.model_fields["run_dir"].default
    return Path(run_dir).resolve()


@config_class
class KafkaSettings:
    """How to reach Kafka.

    ``extra`` holds librdkafka properties passed through unchanged to every
    producer, consumer and admin client (SASL/SSL settings live there).
    ``idempotence`` says whether the broker's idempotent producer is safe to use
    (``EM3_PRODUCER_IDEMPOTENCE``): True for Apache Kafka; the embedded Tansu 0.6
    broker is started with it off, because its idempotence loses acknowledged
    records across a crash (``benchmarks/tansu_idempotence.py``). Producers that
    need at-least-once delivery then rely on retries alone.
    """

    bootstrap_servers: NonEmptyStr  # host:port[,host:port]
    extra: Mapping[str, str] = field(default_factory=dict)
    idempotence: bool = True

    def __repr__(self) -> str:
        extra = {k: "***" if any(w in k.lower() for w in _SECRET_WORDS) else v for k, v in self.extra.items()}
        return (f"KafkaSettings(bootstrap_servers={self.bootstrap_servers!r}, extra={extra!r}, "
                f"idempotence={self.idempotence!r})")

    def client_config(self, **overrides: object) -> dict[str, object]:
        """A librdkafka config dict: bootstrap servers, pass-through extras, then overrides."""
        config: dict[str, object] = {"bootstrap.servers": self.bootstrap_servers}
        config.update(self.extra)
        config.update(overrides)
        return config


@config_class
class RedisSettings:
    """How to reach Redis: a URL (``redis://`` or ``rediss://`` for TLS, auth in the URL)
    plus optional TLS files."""

    url: RedisUrl
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __repr__(self) -> str:
        """The URL with its password masked.

        >>> RedisSettings("redis://:pw@127.0.0.1:6379/0")
        RedisSettings(url='redis://:***@127.0.0.1:6379/0', ssl_ca_certs=None, ssl_certfile=None, ssl_keyfile=None)
        """
        return (f"RedisSettings(url={redact_url(self.url)!r}, ssl_ca_certs={self.ssl_ca_certs!r}, "
                f"ssl_certfile={self.ssl_certfile!r}, ssl_keyfile={self.ssl_keyfile!r})")


@config_class
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

    @property
    def deletions(self) -> str:
        """The compacted topic of user deletion requests (keyed by tombstone id)."""
        return f"{self.prefix}deletions"

    def all(self) -> list[str]:
        """The event topics (co-partitioned by user); :attr:`deletions` is apart."""
        return [self.impressions, self.clicks, self.conversions, self.samples, self.dead_letter]


@config_class
class Settings:
    """Everything a process needs to find the shared infrastructure.

    ``api_key`` is what the HTTP server's write endpoints require,
    ``snapshot_key`` the HMAC key of snapshot manifests and ``user_id_key``
    (and ``user_id_key_previous`` during a rotation) the HMAC key of user
    pseudonyms (:class:`em3.privacy.Pseudonymizer`); all are left out of
    ``repr``. ``allow_raw_user_ids`` lets raw IDs through an edge without a key
    (local demos only). ``retention`` holds every store's retention period.
    """

    kafka: KafkaSettings
    redis: RedisSettings
    topics: TopicNames = TopicNames()
    redis_prefix: str = "em3:"
    api_key: str = field(default="", repr=False)
    snapshot_key: str = field(default="", repr=False)
    user_id_key: str = field(default="", repr=False)
    user_id_key_previous: str = field(default="", repr=False)
    allow_raw_user_ids: bool = False
    retention: RetentionConfig = RetentionConfig()

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


class EnvSettings(BaseSettings):
    """The ``EM3_*`` environment: each field is read from ``EM3_`` + its name in upper
    case (``redis_url`` from ``EM3_REDIS_URL``), and ``kafka`` from every
    ``EM3_KAFKA_<KEY>``.

    Parameters
    ----------
    bootstrap_servers : str
        Kafka bootstrap servers, ``host:port[,host:port]`` (flag ``--bootstrap-servers``).
    redis_url : str
        Redis URL: ``redis://:password@host:6379/0``, ``rediss://`` for TLS (flag ``--redis-url``).
    topic_prefix : str
        Prefix of every topic name (flag ``--topic-prefix``).
    kafka : mapping
        librdkafka properties for every producer, consumer and admin client:
        ``EM3_KAFKA_SECURITY_PROTOCOL=SASL_SSL`` gives ``security.protocol`` (``_`` for
        ``.``; flag ``--kafka-option KEY=VALUE``).
    redis_ssl_ca_certs, redis_ssl_certfile, redis_ssl_keyfile : str
        TLS files for a ``rediss://`` URL.
    run_dir : str
        Where ``em3 services`` keeps pid files, logs and the services file.
    api_key : str
        Key the HTTP server's write endpoints require (default: the services file's).
    snapshot_key : str
        HMAC key of snapshot manifests, shared by learners and servers (default: the
        services file's).
    user_id_key : str
        HMAC key that turns raw user IDs into pseudonyms at the edge (servers, replay;
        default: the services file's). Without one the edge refuses to start unless
        ``allow_raw_user_ids``.
    user_id_key_previous : str
        The key before the last rotation (``em3 users rotate-key``).
    allow_raw_user_ids : bool
        Let raw user IDs through an edge without a key (``EM3_ALLOW_RAW_USER_IDS=1``;
        local demos only). Retention periods come from ``EM3_RETENTION_<FIELD>``
        (:class:`em3.privacy.RetentionConfig`).
    producer_idempotence : bool
        Whether producers that must deliver at least once (the server's impressions and
        clicks) use the broker's idempotent producer (``on``/``off``; default: the
        services file's, else on). On for Apache Kafka; ``em3 services up`` records off
        for the embedded Tansu, whose idempotence loses acknowledged records across a
        crash.
    """

    model_config = SettingsConfigDict(env_prefix="EM3_", env_ignore_empty=True, extra="ignore", frozen=True)

    bootstrap_servers: NonEmptyStr = "127.0.0.1:9092"
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    topic_prefix: str = "em3."
    kafka: dict[str, str] = _Field(default_factory=dict)
    redis_ssl_ca_certs: str | None = None
    redis_ssl_certfile: str | None = None
    redis_ssl_keyfile: str | None = None
    run_dir: str = "runs/services"
    api_key: str = _Field(default="", repr=False)
    snapshot_key: str = _Field(default="", repr=False)
    user_id_key: str = _Field(default="", repr=False)
    user_id_key_previous: str = _Field(default="", repr=False)
    allow_raw_user_ids: bool = False
    producer_idempotence: bool = True


class _Environment(EnvSettingsSource):
    """``EM3_*`` variables from a given mapping (``os.environ`` by default), plus the
    ``EM3_KAFKA_<KEY>`` pass-through."""

    _KAFKA = "EM3_KAFKA_"

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str] | None) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self._env is None:
            return super()._load_env_vars()
        return {k.lower(): v for k, v in self._env.items() if v != ""}

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        kafka = {key[len(self._KAFKA):].lower().replace("_", "."): value
                 for key, value in self.env_vars.items() if key.upper().startswith(self._KAFKA) and value}
        if kafka:
            values["kafka"] = kafka
        return values


class _ServicesFile(PydanticBaseSettingsSource):
    """The addresses and keys in ``RUN_DIR/services.json`` (``RUN_DIR`` as the sources
    above it say); an unreadable file counts as absent."""

    KEYS = ("bootstrap_servers", "redis_url", "api_key", "snapshot_key", "user_id_key", "user_id_key_previous")

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        run_dir = self.current_state.get("run_dir") or self.settings_cls.model_fields["run_dir"].default
        path = Path(run_dir).resolve() / "services.json"
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict):
            return {}
        values: dict[str, Any] = {k: doc[k] for k in self.KEYS if isinstance(doc.get(k), str) and doc[k]}
        if isinstance(doc.get("producer_idempotence"), bool):
            values["producer_idempotence"] = doc["producer_idempotence"]
        return values


def _environment(env: Mapping[str, str] | None = None, **explicit: Any) -> EnvSettings:
    """:class:`EnvSettings` from ``explicit`` values, then ``env`` (``os.environ`` if
    None), then the services file, then the defaults."""
    sources = (InitSettingsSource(EnvSettings, explicit), _Environment(EnvSettings, env),
               _ServicesFile(EnvSettings))
    try:
        return EnvSettings(_build_sources=(sources, explicit))
    except ValidationError as exc:
        text = explain(EnvSettings, exc).removeprefix("EnvSettings: ")
        raise ImproperlyConfigured(f"settings (flags, then EM3_* environment, then services.json): {text}") from None


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
    explicit: dict[str, Any] = {"bootstrap_servers": bootstrap_servers or None, "redis_url": redis_url or None,
                                "topic_prefix": topic_prefix, "kafka": dict(kafka_options or {}) or None}
    v = _environment(env, **{k: value for k, value in explicit.items() if value is not None})
    return Settings(
        kafka=KafkaSettings(v.bootstrap_servers, v.kafka, v.producer_idempotence),
        redis=RedisSettings(v.redis_url, ssl_ca_certs=v.redis_ssl_ca_certs, ssl_certfile=v.redis_ssl_certfile,
                            ssl_keyfile=v.redis_ssl_keyfile),
        topics=TopicNames(v.topic_prefix),
        api_key=v.api_key,
        snapshot_key=v.snapshot_key,
        user_id_key=v.user_id_key,
        user_id_key_previous=v.user_id_key_previous,
        allow_raw_user_ids=v.allow_raw_user_ids,
        retention=RetentionConfig.from_env(os.environ if env is None else env),
    )
