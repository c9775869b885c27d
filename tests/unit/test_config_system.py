"""One config system: every config class declares its constraints, each declaration
refuses what it should with a message naming the field, and the EM3_* loader keeps
its precedence (flags > environment > services.json > defaults)."""
from __future__ import annotations

import dataclasses
import json
import pickle
import typing

import annotated_types as at
import pytest

from em3.config import load_settings
from em3.constraints import _declaration, _strip_none, _unwrap, describe
from em3.errors import ImproperlyConfigured

#: (module, class, required kwargs): every config class of the packages.
CONFIGS = [
    ("em3.model.config", "ModelConfig", {}),
    ("em3.experiment", "ArmConfig", {"name": "a", "fraction": 1.0, "model_line": "m"}),
    ("em3.config", "KafkaSettings", {"bootstrap_servers": "b:9092"}),
    ("em3.config", "RedisSettings", {"url": "redis://h:6379/0"}),
    ("stream.join", "JoinConfig", {}),
    ("stream.worker", "WorkerConfig", {}),
    ("stream.app", "AppConfig", {}),
    ("stream.synthetic", "StreamSpec", {}),
    ("learners.loop", "LoopConfig", {}),
    ("learners.publisher", "SnapshotPolicy", {}),
    ("learners.publisher", "PublisherConfig", {}),
    ("learners.worker", "LearnConfig", {"model_line": "m", "model_config": {}}),
    ("learners.actor", "ActorResources", {}),
    ("serving.ranking", "RankingConfig", {}),
    ("serving.reloader", "ReloaderConfig", {"model_line": "m"}),
    ("serving.logger", "ImpressionLoggerConfig", {"topic": "t"}),
    ("serving.toy", "ToyConfig", {}),
    ("simulators.delays", "FixedDelay", {}),
    ("simulators.delays", "ExponentialDelay", {}),
    ("simulators.delays", "LogNormalDelay", {}),
    ("simulators.world", "WorldConfig", {"calibration": "synthetic"}),
    ("simulators.replay", "ReplayConfig", {}),
    ("simulators.ab", "ABConfig", {}),
    ("em3.app.demo", "DemoConfig", {}),
]


def _load(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


def _violations(cls: type, name: str) -> list[object]:
    """Values the declaration of ``cls.name`` must refuse, derived from the declaration."""
    ann, meta = _declaration(cls, (name,))
    ann = _strip_none(ann)
    ann, more = _unwrap(ann)
    meta = meta + more
    bad: list[object] = []
    for m in meta:
        if isinstance(m, at.Gt):
            bad.append(m.gt)
        elif isinstance(m, at.Ge):
            bad.append(m.ge - 1)
        elif isinstance(m, at.Lt):
            bad.append(m.lt)
        elif isinstance(m, at.Le):
            bad.append(m.le + 1)
    if ann is int and bad:
        bad.append(True)  # strict: a bool is not an int
    if typing.get_origin(ann) is typing.Literal:
        bad.append("no-such-choice")
    return bad


def _cases():
    for module, name, required in CONFIGS:
        cls = _load(module, name)
        for field in dataclasses.fields(cls):
            if field.init and field.name not in required:
                for value in _violations(cls, field.name):
                    yield pytest.param(cls, required, field.name, value, id=f"{name}.{field.name}={value!r}")


def test_every_config_class_is_declared_and_builds_with_its_defaults():
    for module, name, required in CONFIGS:
        cls = _load(module, name)
        assert hasattr(cls, "__pydantic_fields__"), f"{name} is not a declared config class"
        config = cls(**required)
        assert pickle.loads(pickle.dumps(config)) == config  # Ray ships configs to actors
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, dataclasses.fields(cls)[0].name, None)
        with pytest.raises(ImproperlyConfigured, match=f"{name}: colour is not a field"):
            cls(**required, colour="red")
    assert len(list(_cases())) > 150  # the declarations carry the checks, not prose


@pytest.mark.parametrize("cls, required, field, value", list(_cases()))
def test_each_declared_constraint_refuses_with_the_field_the_rule_and_the_value(cls, required, field, value):
    expected = describe(cls, field)
    with pytest.raises(ImproperlyConfigured) as err:
        cls(**required, **{field: value})
    message = str(err.value)
    assert message.startswith(f"{cls.__name__}: {field} must be ") and expected in message, message
    assert f"but {value!r} is given" in message
    # replace() checks again: a copy cannot break what construction refused.
    with pytest.raises(ImproperlyConfigured):
        dataclasses.replace(cls(**required), **{field: value})


def test_nested_and_cross_field_errors_name_their_path():
    from em3.experiment import ExperimentConfig
    from learners.worker import LearnConfig

    with pytest.raises(ImproperlyConfigured, match=r"LearnConfig: loop\.batch_size must be > 0, but 0 is given"):
        LearnConfig("m", {}, loop={"batch_size": 0})
    with pytest.raises(ImproperlyConfigured, match=r"arms\[1\]\.fraction must be in \(0, 1\], but 1.5 is given"):
        ExperimentConfig("x", ({"name": "a", "fraction": 0.5, "model_line": "a"},
                               {"name": "b", "fraction": 1.5, "model_line": "b"}))
    with pytest.raises(ImproperlyConfigured, match="arm fractions must add up to 1, but they add up to 0.9"):
        ExperimentConfig.from_dict({"name": "x", "arms": [{"name": "a", "fraction": 0.9, "model_line": "a"}]})


def test_a_secret_is_never_echoed():
    from em3.config import RedisSettings
    from em3.experiment import ExperimentConfig
    from serving.server import ServerConfig

    with pytest.raises(ImproperlyConfigured) as err:
        ServerConfig(ExperimentConfig.single_line("m"), api_key=12345)  # repr=False field
    assert "12345" not in str(err.value) and "api_key must be a string" in str(err.value)
    with pytest.raises(ImproperlyConfigured) as err:
        RedisSettings("http://:hunter2@host/0")
    assert "hunter2" not in str(err.value) and "http://:***@host/0" in str(err.value)


# ------------------------------------------------------------------- the loader
def _run_dir(tmp_path, **doc):
    (tmp_path / "services.json").write_text(json.dumps(doc))
    return {"EM3_RUN_DIR": str(tmp_path)}


def test_flags_beat_the_environment_which_beats_the_services_file_which_beats_the_defaults(tmp_path):
    env = _run_dir(tmp_path, bootstrap_servers="file:1", redis_url="redis://file:2/0", api_key="file-key")
    s = load_settings(env)
    assert (s.kafka.bootstrap_servers, s.redis.url, s.api_key) == ("file:1", "redis://file:2/0", "file-key")
    s = load_settings({**env, "EM3_BOOTSTRAP_SERVERS": "env:1", "EM3_API_KEY": "env-key"})
    assert (s.kafka.bootstrap_servers, s.redis.url, s.api_key) == ("env:1", "redis://file:2/0", "env-key")
    s = load_settings({**env, "EM3_BOOTSTRAP_SERVERS": "env:1"}, bootstrap_servers="flag:1")
    assert s.kafka.bootstrap_servers == "flag:1"
    s = load_settings({"EM3_RUN_DIR": str(tmp_path / "none")})
    assert (s.kafka.bootstrap_servers, s.redis.url, s.topics.prefix) == ("127.0.0.1:9092", "redis://127.0.0.1:6379/0",
                                                                        "em3.")


def test_kafka_passthrough_topic_prefix_and_empty_variables(tmp_path):
    env = {"EM3_RUN_DIR": str(tmp_path), "EM3_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "EM3_KAFKA_SASL_MECHANISM": "PLAIN",
           "EM3_TOPIC_PREFIX": "prod.", "EM3_BOOTSTRAP_SERVERS": "", "EM3_REDIS_SSL_CA_CERTS": "/ca.pem"}
    s = load_settings(env, kafka_options={"sasl.mechanism": "SCRAM-SHA-512"})
    assert s.kafka.extra == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}  # the flag wins
    assert s.topics.samples == "prod.samples" and s.redis.ssl_ca_certs == "/ca.pem"
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"  # an empty variable counts as unset
    assert load_settings(env, topic_prefix="").topics.samples == "samples"


def test_os_environ_is_the_default_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EM3_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("EM3_REDIS_URL", "rediss://:pw@secure:6380/1")
    monkeypatch.setenv("EM3_KAFKA_LINGER_MS", "5")
    s = load_settings()
    assert s.redis.url == "rediss://:pw@secure:6380/1" and s.kafka.extra["linger.ms"] == "5"


def test_a_bad_variable_or_an_unreadable_services_file(tmp_path):
    with pytest.raises(ImproperlyConfigured) as err:
        load_settings({"EM3_RUN_DIR": str(tmp_path), "EM3_REDIS_URL": "http://:hunter2@h/0"})
    assert "redis_url must be a string matching" in str(err.value) and "hunter2" not in str(err.value)
    (tmp_path / "services.json").write_text("[1, 2")
    assert load_settings({"EM3_RUN_DIR": str(tmp_path)}).kafka.bootstrap_servers == "127.0.0.1:9092"
    (tmp_path / "services.json").write_text("[1, 2]")
    assert load_settings({"EM3_RUN_DIR": str(tmp_path)}).kafka.bootstrap_servers == "127.0.0.1:9092"


def test_the_cli_prints_a_bad_flag_as_one_line(capsys):
    from em3.app.cli import main

    assert main(["replay", "--file", "x.jsonl", "--start-at", "-1", "--allow-raw-user-ids"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "em3 replay: ReplayConfig: start_at must be >= 0, but -1 is given"
