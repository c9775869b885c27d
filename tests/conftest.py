"""Shared fixtures.

Integration fixtures start the real services they need: a Tansu Kafka-protocol
broker and a Redis server (one pair per test session, on free loopback ports),
and a local Ray runtime. Each test gets its own topic prefix and Redis key
prefix so tests never see each other's data.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames


@pytest.fixture(scope="session")
def local_service_processes(tmp_path_factory):
    """The session's :class:`em3.app.services.LocalServices` (for tests that pause Redis)."""
    from em3.app.services import LocalServices

    services = LocalServices(tmp_path_factory.mktemp("services"))
    services.start()
    yield services
    services.stop()


@pytest.fixture(scope="session")
def local_services(local_service_processes):
    """A real Tansu broker and Redis server for the whole session."""
    return local_service_processes.info


@pytest.fixture
def settings(local_services) -> Settings:
    """Settings pointing at the session's services, with a fresh topic and key prefix."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        kafka=KafkaSettings(local_services.bootstrap_servers),
        redis=RedisSettings(local_services.redis_url),
        topics=TopicNames(f"t{tag}."),
        redis_prefix=f"t{tag}:",
        api_key=local_services.api_key,
        snapshot_key=local_services.snapshot_key,
        user_id_key=local_services.user_id_key,
    )


@pytest.fixture
def redis_client(settings):
    from em3.redis_stores import connect

    client = connect(settings.redis)
    yield client
    client.close()


@pytest.fixture(scope="session")
def ray_runtime(tmp_path_factory):
    """A local Ray runtime (real actors, real processes) for the session."""
    import ray

    tmp = Path("/tmp") / f"ray-{uuid.uuid4().hex[:6]}"  # AF_UNIX paths must stay short
    os.environ.setdefault("RAY_TMPDIR", str(tmp))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        ignore_reinit_error=True,
        _temp_dir=str(tmp),
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
