"""Shared fixtures.

Integration fixtures start the real services they need: a Tansu Kafka-protocol
broker and a Redis server (one pair per test session, on free loopback ports),
and a local Ray runtime. Each test gets its own topic prefix and Redis key
prefix so tests never see each other's data.

Hypothesis runs under the profile named by ``EM3_HYPOTHESIS_PROFILE``: ``default``
(hypothesis' own, 100 examples) in the full suite, ``fast`` (10 examples) in
``scripts/test.sh --fast``. Tests that ask for more examples scale the profile's
count (``3 * settings.default.max_examples``), so the fast lane runs a tenth of each.

The cyclic garbage collector is off while pytest imports the packages and test
modules (torch, sklearn and the rest: about half a million objects that live for the
whole session, so collecting them finds nothing); what survives is frozen before the
first test, so full collections skip it, and young collections run every 10,000
allocations instead of 700. This changes only the time taken: the fast lane spent
5.9 s of CPU in the collector with CPython's defaults and 1.4 s with these, at the
same peak memory (1.5 GB). ``stream.worker.tune_gc`` tunes the join process's
collector for the same kind of reason.
"""
from __future__ import annotations

import gc
import json
import os
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames

hypothesis_settings.register_profile("fast", max_examples=10)
hypothesis_settings.load_profile(os.environ.get("EM3_HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    gc.disable()  # until collection has imported everything (see the module docstring)


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()  # what collection imported lives for the session: later collections skip it
    gc.set_threshold(10_000, 10, 10)  # young collections every 10,000 allocations, not 700
    gc.enable()


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


# --------------------------------------------------------------------------- the A/B report page


class _ReportOutline(HTMLParser):
    """What a report page holds: its sections in order, charts, table cells, appendix."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[str] = []  # ids of every <section>, in document order
        self.text: dict[str, list[str]] = {}  # section id -> its text, nested sections included
        self.charts: dict[str, int] = {}  # section id -> <svg class="chart"> inside it
        self.marks: dict[str, int] = {}  # section id -> drawn elements (path, polygon, rect) inside it
        self.tables: dict[str, int] = {}  # section id -> <table> inside it
        self.cells: list[str] = []
        self.h1: dict[str, str] = {}
        self.details, self.scripts, self.pre = 0, 0, ""
        self._open: list[str] = []  # stack of open sections (None for those without an id)
        self._cell: list[str] | None = None
        self._in: set[str] = set()
        self.feed(page)

    def _count(self, table: dict[str, int]) -> None:
        for sid in self._open:
            table[sid] = table.get(sid, 0) + 1

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            sid = attrs.get("id") or "?"
            self.sections.append(sid)
            self._open.append(sid)
        elif tag == "svg" and "chart" in (attrs.get("class") or "").split():
            self._count(self.charts)
        elif tag in ("path", "polygon", "rect"):
            self._count(self.marks)
        elif tag == "table":
            self._count(self.tables)
        elif tag == "td":
            self._cell = []
        elif tag == "details":
            self.details += 1
        elif tag == "script":
            self.scripts += 1
        if tag in ("h1", "pre", "title"):
            self._in.add(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag == "section":
            self._open.pop()

    def handle_endtag(self, tag):
        if tag == "section" and self._open:
            self._open.pop()
        elif tag == "td" and self._cell is not None:
            self.cells.append(" ".join("".join(self._cell).split()))
            self._cell = None
        self._in.discard(tag)

    def handle_data(self, data):
        if "title" in self._in:  # the SVG <title>: a label, not shown text
            return
        for sid in self._open:
            self.text.setdefault(sid, []).append(data)
        if self._cell is not None:
            self._cell.append(data)
        if "h1" in self._in and self._open:
            self.h1[self._open[-1]] = self.h1.get(self._open[-1], "") + data
        if "pre" in self._in:
            self.pre += data


def report_page_problems(page: str, *, learning: bool = True, min_charts: int = 2) -> list[str]:
    """Every way ``page`` falls short of the report's outline (empty when it holds):
    verdict (and learning) first, then plots, tables and the raw-JSON appendix; every
    table cell a short formatted figure, never a raw dict or list; no JavaScript."""
    o = _ReportOutline(page)
    problems = []
    required = ["verdict"] + (["learning"] if learning else []) + ["plots", "tables", "appendix"]
    missing = [s for s in required if s not in o.sections]
    problems += [f"section {s!r} is missing" for s in missing]
    present = [s for s in required if s in o.sections]
    if [s for s in o.sections if s in present] != present:
        problems.append(f"sections out of order: {[s for s in o.sections if s in present]}, expected {present}")
    verdict = " ".join("".join(o.text.get("verdict", [])).split())
    if "verdict" in o.sections:
        if not o.h1.get("verdict", "").strip():
            problems.append("the verdict has no headline")
        for needed in ("always-valid", "Unit", "Training data", "Stopped"):
            if needed not in verdict:
                problems.append(f"the verdict does not say {needed!r}")
        if "stopped early" in verdict.lower():
            problems.append("the verdict says 'stopped early' instead of a stop reason")
    if learning and "learning" in o.sections:
        if o.charts.get("learning", 0) < 1:
            problems.append("the learning card has no AUC chart")
        if o.tables.get("learning", 0) < 1:
            problems.append("the learning card has no checks")
    if "plots" in o.sections:
        if o.charts.get("plots", 0) < min_charts:
            problems.append(f"{o.charts.get('plots', 0)} charts under plots, expected >= {min_charts}")
        if o.marks.get("plots", 0) < o.charts.get("plots", 0):
            problems.append("some charts draw nothing")
    if "tables" in o.sections and o.tables.get("tables", 0) < 2:
        problems.append(f"{o.tables.get('tables', 0)} tables under tables, expected >= 2")
    for cell in o.cells:
        raw = None
        try:
            raw = json.loads(cell)
        except ValueError:
            pass
        if not cell:
            problems.append("an empty table cell")
        elif isinstance(raw, (dict, list)) or "{" in cell or "': " in cell or '":' in cell:
            problems.append(f"a table cell holds a raw value: {cell[:80]!r}")
        elif len(cell) > 60:
            problems.append(f"a table cell is too long to read: {cell[:80]!r}")
    if "appendix" in o.sections:
        if o.details < 1:
            problems.append("the appendix is not collapsed in <details>")
        try:
            if not isinstance(json.loads(o.pre), dict):
                problems.append("the appendix does not hold the JSON report")
        except ValueError:
            problems.append("the appendix does not hold the JSON report")
    if o.scripts:
        problems.append(f"{o.scripts} <script> elements: the page must need no JavaScript")
    return problems


@pytest.fixture
def report_problems():
    """:func:`report_page_problems`: what a report page lacks (an empty list when it is whole)."""
    return report_page_problems
