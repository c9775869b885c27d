"""`em3 serve` wiring: flags become a runtime; configs refuse bad values."""
from __future__ import annotations

import argparse
import json

import pytest

from serving.server import ServerConfig


def _parse(argv):
    from serving.cli import register

    parser = argparse.ArgumentParser(prog="em3")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_serve_flags_build_a_runtime_for_an_experiment(tmp_path, monkeypatch):
    from serving.cli import build_runtime

    monkeypatch.setenv("EM3_USER_ID_KEY", "k")
    monkeypatch.setenv("EM3_RUN_DIR", str(tmp_path))
    exp = {"name": "e", "salt": "s", "arms": [
        {"name": "a", "fraction": 0.5, "kind": "line", "model_line": "main"},
        {"name": "b", "fraction": 0.3, "kind": "snapshot", "model_line": "main", "version": 4},
        {"name": "c", "fraction": 0.2, "kind": "random"},
    ]}
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(exp))
    args = _parse(["serve", "--experiment", str(path), "--redis-url", "redis://127.0.0.1:1/0",
                   "--bootstrap-servers", "127.0.0.1:1", "--redis-prefix", "x:", "--max-candidates", "10",
                   "--precompute-max-items", "5"])
    runtime = build_runtime(args)
    try:
        assert sorted(runtime.reloaders) == ["main", "main@4"]
        assert runtime.settings.redis_prefix == "x:"
        assert runtime.config.ranking.max_candidates == 10
        assert runtime.config.ranking.precompute_max_items == 5
        assert runtime.config.request_threads == 1 and runtime.config.precompute_threads == 1
        assert runtime.owns_clients
        assert {type(r.loader).__name__ for r in runtime.reloaders.values()} == {"EM3Loader"}
    finally:
        runtime.stop()


def test_serve_refuses_raw_user_ids_unless_allowed(tmp_path, monkeypatch):
    from em3.errors import ImproperlyConfigured
    from serving.cli import build_runtime

    monkeypatch.delenv("EM3_USER_ID_KEY", raising=False)
    monkeypatch.delenv("EM3_ALLOW_RAW_USER_IDS", raising=False)
    monkeypatch.setenv("EM3_RUN_DIR", str(tmp_path))  # no services.json with a key
    argv = ["serve", "--model-line", "main", "--redis-url", "redis://127.0.0.1:1/0", "--bootstrap-servers", "127.0.0.1:1"]
    with pytest.raises(ImproperlyConfigured, match="EM3_USER_ID_KEY"):
        build_runtime(_parse(argv))
    runtime = build_runtime(_parse(argv + ["--allow-raw-user-ids"]))
    try:
        assert not runtime.pseudonymize.keyed and runtime.pseudonymize("alice") == "alice"
    finally:
        runtime.stop()


def test_model_line_and_experiment_are_exclusive():
    with pytest.raises(SystemExit):
        _parse(["serve", "--model-line", "a", "--experiment", "x.json"])
    with pytest.raises(SystemExit):
        _parse(["serve"])


@pytest.mark.parametrize("field, value, expected", [("poll_interval_s", -3, "> 0"), ("max_body_bytes", 0, "> 0"),
                                                    ("request_threads", -1, "> 0 or None"),
                                                    ("precompute_nice", 20, r"in \[0, 19\]"),
                                                    ("rank_executor", "fork", "one of 'loop', 'threads'")])
def test_server_config_messages(field, value, expected):
    from em3.experiment import ExperimentConfig

    with pytest.raises(ValueError, match=f"{field} must be {expected}, but {value!r} is given"):
        ServerConfig(ExperimentConfig.single_line("main"), **{field: value})
