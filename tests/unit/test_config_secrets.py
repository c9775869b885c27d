"""Secrets reach the settings (environment first, then services.json) and never their repr."""
from __future__ import annotations

import json
import os
import stat

import pytest

from em3.config import KafkaSettings, RedisSettings, Settings, load_settings, redact_url


def _services_file(tmp_path, **doc):
    (tmp_path / "services.json").write_text(json.dumps(doc))
    return {"EM3_RUN_DIR": str(tmp_path)}


def test_keys_come_from_the_services_file(tmp_path):
    env = _services_file(tmp_path, bootstrap_servers="127.0.0.1:1", redis_url="redis://:pw@127.0.0.1:2/0",
                         api_key="file-api", snapshot_key="file-snap")
    s = load_settings(env)
    assert (s.api_key, s.snapshot_key, s.redis.url) == ("file-api", "file-snap", "redis://:pw@127.0.0.1:2/0")


def test_environment_overrides_the_services_file(tmp_path):
    env = _services_file(tmp_path, api_key="file-api", snapshot_key="file-snap")
    s = load_settings({**env, "EM3_API_KEY": "env-api", "EM3_SNAPSHOT_KEY": "env-snap"})
    assert (s.api_key, s.snapshot_key) == ("env-api", "env-snap")


def test_producer_idempotence_comes_from_the_environment_then_the_services_file(tmp_path):
    from em3.errors import ImproperlyConfigured

    assert load_settings({"EM3_RUN_DIR": str(tmp_path)}).kafka.idempotence is True  # Apache Kafka: safe
    env = _services_file(tmp_path, producer_idempotence=False)  # written by LocalServices (Tansu)
    assert load_settings(env).kafka.idempotence is False
    assert load_settings({**env, "EM3_PRODUCER_IDEMPOTENCE": "on"}).kafka.idempotence is True
    with pytest.raises(ImproperlyConfigured, match="producer_idempotence must be true or false"):
        load_settings({**env, "EM3_PRODUCER_IDEMPOTENCE": "maybe"})


def test_no_keys_anywhere_gives_empty_keys_and_the_old_defaults(tmp_path):
    s = load_settings({"EM3_RUN_DIR": str(tmp_path)})
    assert (s.api_key, s.snapshot_key) == ("", "")
    assert s.redis.url == "redis://127.0.0.1:6379/0" and s.kafka.bootstrap_servers == "127.0.0.1:9092"


def test_repr_shows_no_secret():
    s = Settings(
        KafkaSettings("b:9092", {"sasl.password": "kafka-secret", "security.protocol": "SASL_SSL"}),
        RedisSettings("redis://user:redis-secret@host:6379/0"),
        api_key="api-secret",
        snapshot_key="snap-secret",
    )
    text = repr(s) + str(s)
    for secret in ("kafka-secret", "redis-secret", "api-secret", "snap-secret"):
        assert secret not in text
    assert "redis://user:***@host:6379/0" in text and "SASL_SSL" in text


def test_a_bad_redis_url_error_does_not_echo_its_password():
    from em3.errors import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured) as err:
        RedisSettings("http://:leaky@host/0")
    assert "leaky" not in str(err.value)


@pytest.mark.parametrize("url, masked", [
    ("redis://:a%40b@h:1/0", "redis://:***@h:1/0"),
    ("redis://h:1/0", "redis://h:1/0"),
    ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
])
def test_redact_url(url, masked):
    assert redact_url(url) == masked


def test_service_info_puts_a_quoted_password_in_the_url_and_none_in_its_repr():
    from redis.connection import parse_url

    from em3.app.services import ServiceInfo

    info = ServiceInfo(1, 2, redis_password="p@ss/w:rd %", api_key="k1", snapshot_key="k2")
    assert parse_url(info.redis_url)["password"] == "p@ss/w:rd %"
    assert not {"p@ss", "k1", "k2"} & set(repr(info).replace("'", " ").replace("=", " ").split())
    assert info.redis_address == "127.0.0.1:2"


def test_local_services_generates_distinct_credentials(tmp_path):
    from em3.app.services import LocalServices

    a, b = LocalServices(tmp_path / "a").info, LocalServices(tmp_path / "b").info
    for info in (a, b):
        assert len({info.redis_password, info.api_key, info.snapshot_key}) == 3
        assert all(len(x) >= 32 for x in (info.redis_password, info.api_key, info.snapshot_key))
    assert a.redis_password != b.redis_password and a.api_key != b.api_key


def test_private_files_are_owner_only(tmp_path):
    from em3.app.services import _write_private

    path = tmp_path / "services.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    _write_private(path, '{"api_key": "x"}')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and json.loads(path.read_text()) == {"api_key": "x"}
