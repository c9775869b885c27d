"""The house keeps its shape: import contracts between the packages, checked on the
source (an AST walk of every module, including imports inside functions).

Layers, top to bottom: the app modules (CLI, demo, service manager, config reference)
> learners | serving | simulators > stream > the core (em3). A module may import its
own layer and the layers below, never above; learners and serving never import each
other. Each package has at most one module that may import each I/O client (redis,
confluent_kafka, ray), and nobody imports another package's private (``_name``)
modules. :func:`violations` is the checker; the last test shows it catches a planted
violation.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("em3", "stream", "learners", "serving", "simulators")
#: The composition roots: the app package (em3/app/) and each package's command-line
#: entry points; the top layer, so the core below them stays clean.
APP = {"em3.app", "em3.app.cli", "em3.app.demo", "em3.app.services", "em3.app.configdoc", "em3.app.users",
       "em3.app.closed_loop",
       "em3.__main__",
       "stream.__main__", "stream.cli", "learners.cli", "serving.cli", "simulators.cli"}
RANK = {"em3": 0, "stream": 1, "learners": 2, "serving": 2, "simulators": 2, "app": 3}
#: package -> client -> the one module of that package allowed to import it
CLIENTS = {
    "em3": {"redis": "em3.redis_stores"},
    "stream": {"redis": "stream.state", "confluent_kafka": "stream.kafka"},
    "learners": {"ray": "learners.actor"},
    "serving": {},
    "simulators": {},
}


def _modules() -> dict[str, Path]:
    out = {f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")}  # scripts: the app layer
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path) -> list[str]:
    """Every module name ``path`` imports (absolute imports, at any depth)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _layer(module: str) -> str:
    return "app" if module in APP or module.startswith("benchmarks.") else module.split(".")[0]


def violations(graph: dict[str, list[str]]) -> list[str]:
    """Every broken contract in ``graph`` (module -> imported names)."""
    out = []
    for module, imported in graph.items():
        layer, pkg = _layer(module), module.split(".")[0]
        if pkg == "benchmarks":  # scripts may use any package, but not private modules or clients
            pkg = "app"
        for name in imported:
            top = name.split(".")[0]
            if top in PACKAGES:
                target = name if name in graph else name.rsplit(".", 1)[0]
                other = _layer(target) if target in graph else top
                if other != layer and RANK[other] >= RANK[layer] and other != "app" or (
                        other == "app" and layer != "app"):
                    out.append(f"{module} -> {name}: {layer} may not import {other}")
                if {layer, other} == {"learners", "serving"}:
                    out.append(f"{module} -> {name}: learners and serving are independent")
                if top != pkg and any(part.startswith("_") and part != "__main__" for part in name.split(".")[1:]):
                    if target in graph or any(p.startswith("_") for p in target.split(".")[1:]):
                        out.append(f"{module} -> {name}: another package's private module")
            for client in ("redis", "confluent_kafka", "ray"):
                if top == client and layer != "app":
                    allowed = CLIENTS.get(pkg, {}).get(client)
                    if module != allowed:
                        out.append(f"{module} imports {client}: only {allowed or 'no module'} of {pkg} may")
    return sorted(set(out))


@pytest.fixture(scope="module")
def source_graph() -> dict[str, list[str]]:
    """The import graph of the source tree, parsed once for the tests below (about 1 s)."""
    return {name: imports_of(path) for name, path in _modules().items()}


def test_the_packages_keep_their_layers_and_io_boundaries(source_graph):
    assert violations(source_graph) == []


def test_the_core_imports_no_package_above_it(source_graph):
    graph = source_graph
    core = [m for m in graph if m.startswith("em3") and m not in APP]
    assert core and not [(m, n) for m in core for n in graph[m]
                         if n.split(".")[0] in ("stream", "learners", "serving", "simulators")]


def test_a_planted_violation_is_caught(source_graph):
    graph = dict(source_graph)  # a copy: the other tests see the real graph
    graph["em3.codec"] = graph["em3.codec"] + ["serving.server"]  # the core reaching up
    graph["learners.loop"] = graph["learners.loop"] + ["serving.ranking"]  # siblings
    graph["serving.ranking"] = graph["serving.ranking"] + ["redis"]  # an I/O client outside its module
    graph["learners.online"] = graph["learners.online"] + ["simulators._kafka_sink"]  # a private module
    found = violations(graph)
    assert any(v.startswith("em3.codec -> serving.server") for v in found)
    assert any("learners and serving are independent" in v for v in found)
    assert any(v.startswith("serving.ranking imports redis") for v in found)
    assert any("private module" in v for v in found)
