"""compose/docker-compose.yml is a valid compose file and only runs commands that exist."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _vendored_compose_schema() -> dict:
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("check-jsonschema is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_file_passes_the_compose_spec_schema():
    exe = shutil.which("check-jsonschema")
    assert exe is not None, "check-jsonschema is a dev dependency; run scripts/setup.sh"
    run = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_schema_check_catches_a_broken_file():
    import jsonschema

    schema = _vendored_compose_schema()
    broken = {"services": {"x": {"image": 3, "healthcheck": {"interval": []}}}}
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def _em3_commands(doc: dict) -> list[tuple[str, list[str]]]:
    out = []
    for name, service in doc["services"].items():
        command = service.get("command")
        image = service.get("image", "")
        uses_em3_entrypoint = (image.startswith("em3-stream") or "build" in service) and "entrypoint" not in service
        if isinstance(command, list) and uses_em3_entrypoint:
            out.append((name, [str(c) for c in command]))  # the image's ENTRYPOINT is `em3`
        elif isinstance(command, str) and command.startswith("em3 "):
            out.append((name, command.split()[1:]))
    return out


def test_every_em3_command_in_the_compose_file_parses():
    from em3.app.cli import _build_parser  # the real `em3` parser, with every package's subcommands

    parser = _build_parser()
    commands = _em3_commands(_compose())
    assert {name for name, _ in commands} >= {"topics", "join", "learner-em3", "learner-id-only", "server",
                                              "simulator"}
    for name, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse exits on an unknown command or flag
            pytest.fail(f"service {name!r}: `em3 {' '.join(argv)}` does not parse ({exc})")


def test_infrastructure_is_real_kafka_in_kraft_mode_with_healthchecks():
    doc = _compose()
    kafka = doc["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    for name in ("kafka", "redis", "join", "ray-head", "server"):
        assert "healthcheck" in doc["services"][name], name
    # The Ray services run the ray CLI in the project image; a GPU profile reserves a device.
    assert doc["services"]["ray-head"]["entrypoint"] == ["ray"]
    gpu = doc["services"]["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # Prometheus scrapes every em3 service that serves /metrics.
    prometheus = yaml.safe_load((ROOT / "compose" / "prometheus.yml").read_text())
    targets = {t.split(":")[0] for job in prometheus["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    assert targets >= {"server", "join", "learner-em3", "learner-id-only", "ray-head"}
    assert set(targets) <= set(doc["services"])
    assert (ROOT / "compose" / "Dockerfile").exists()
    assert doc["services"]["topics"]["build"]["dockerfile"] == "compose/Dockerfile"


def test_only_the_ranking_server_is_published_and_internal_services_need_credentials():
    doc = _compose()
    services = doc["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"server"}
    # Every other service sits on the internal network only; it has no route out.
    assert doc["networks"]["internal"]["internal"] is True
    for name, service in services.items():
        networks = set(service.get("networks", []))
        assert "internal" in networks, name
        if name != "server":
            assert networks == {"internal"}, name
    # Redis requires a password that compose refuses to start without; clients get it in their URL.
    redis_command = " ".join(services["redis"]["command"])
    assert "--requirepass ${EM3_REDIS_PASSWORD:?" in redis_command
    env = doc["x-em3-env"]
    assert env["EM3_REDIS_URL"].startswith("redis://:${EM3_REDIS_PASSWORD:?")
    for key in ("EM3_API_KEY", "EM3_SNAPSHOT_KEY", "EM3_USER_ID_KEY"):  # refused when unset
        assert env[key].startswith("${" + key + ":?"), key
    for name in ("join", "learner-em3", "learner-id-only", "server", "topics", "simulator"):
        assert services[name]["environment"] is env, name
    # Kafka advertises no listener meant for the host.
    assert "localhost" not in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
