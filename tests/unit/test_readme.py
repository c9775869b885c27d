"""README.md stays true: the config reference matches the code, the commands exist."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from em3.app import configdoc

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_config_reference_is_generated_from_the_current_dataclasses():
    assert configdoc.readme_section(README) == configdoc.render().strip(), (
        "README's configuration reference is stale: run `python3 -m em3.app.configdoc` and paste its output"
    )


def test_every_config_field_is_documented_in_the_readme():
    import dataclasses

    section = configdoc.readme_section(README)
    for _, path in configdoc.CONFIG_CLASSES:
        for field in dataclasses.fields(configdoc._load(path)):
            assert f"| `{field.name}` |" in section, f"{path}.{field.name}"


def test_every_environment_variable_is_documented_with_its_constraint():
    from em3.config import EnvSettings

    section = configdoc.readme_section(README)
    for name in EnvSettings.model_fields:
        variable = "EM3_KAFKA_<KEY>" if name == "kafka" else f"EM3_{name.upper()}"
        assert f"| `{variable}` |" in section, variable
    # Constraints come from the declarations, not from prose.
    assert "| `lora_dropout` | `0.0` | in [0, 1) |" in section
    assert "| `rank_executor` | `'loop'` | one of 'loop', 'threads' |" in section


def test_the_two_commands_and_ci_agree():
    assert "bash scripts/setup.sh && python3 -m em3 demo" in README
    assert "bash scripts/test.sh" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in ci and "exec bash scripts/test.sh" in ci


def test_every_em3_command_line_in_the_readme_parses():
    from em3.app.cli import _build_parser

    parser = _build_parser()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip().rstrip("&").strip()
            for part in line.split(";"):
                part = part.strip()
                if part.startswith("em3 "):
                    commands.append(shlex.split(part)[1:])
    assert len(commands) >= 10
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README command does not parse: em3 {' '.join(argv)}") from None
