"""Serving latency under hot reloads: /v1/rank with 100 candidates and a history of 100.

Starts the local services (Tansu, Redis), registers a catalog (text + PNG image
per item) and user histories in Redis, publishes snapshots of an EM3 model
(default config unless ``--config tiny``) and runs ``em3 serve`` as a
subprocess. Then ``--concurrency`` closed-loop clients call ``/v1/rank`` for
``--duration`` seconds while a publisher pushes a new snapshot version every
``--swap-interval`` seconds; the server swaps each one in (load, verify,
precompute the catalog's item rows, one reference assignment).

``model_forward_p50_ms`` is the bare model on the same input: ``score_candidates``
for 100 candidate rows against 100 history rows, i.e. the model work every request
needs once item rows are cached (``item_rows_per_item_ms`` reports what a row
costs to compute from scratch, ``item_rows_warm_per_item_ms`` what it costs with the
frozen-prefix cache warm, as a swap's precompute pays it per item, off the request
path).
``overhead_ratio`` is ``p50_ms / model_forward_p50_ms``. The bare model runs both
with the server's torch thread count (``--server-torch-threads``, 1 as ``em3 serve``
defaults to) and with torch's default (the core count); ``model_forward_p50_ms`` is
the faster of the two p50s, so the ratio is the conservative one (both are reported).
The CPU is shared, so the bare-model forwards are interleaved with the load: each ``--round-s`` round of
requests is preceded by a burst of bare forwards (in the benchmark process, in a
worker thread as the server runs them, clients paused), and both see the same
background load and the same ongoing snapshot swaps.

``--explain`` measures what explanations cost. Each client's requests rotate, one
by one (each cycle in a random order), between a plain request, a request with
``"explain": true`` (to a second server of this code on the same line, so the plain
server answers only plain requests; ``--explain-on same`` sends them to the plain
server), and a plain request to a baseline ``em3 serve`` running the code before
explanations existed (``git archive`` of ``--baseline-ref``, default
:data:`PRE_EXPLAIN_REF`, or ``--baseline-code``), so all see the same load. That
code reads none of today's snapshots (no CVR head, no ``ctcvr_weight``), so the
baseline serves its own line (``--baseline-snapshots own``): ``publish_line.py``
runs on the baseline's tree and publishes that code's default model (same seed),
a new version every ``--swap-interval`` as the benchmark's own publisher does, and
writes the user histories where that code looks them up (raw user IDs before
pseudonymisation). With a CVR head and the ``ctr`` objective a fourth server,
this code with today's model less the CVR head (``ctcvr_weight`` 0, its own line),
joins the rotation (``--no-cvr-off-server``: not), which splits the plain requests'
distance from the baseline into what the CVR head costs and what the rest of the
code since the baseline costs. It adds ``explain_p50_ms``, ``baseline_p50_ms`` and
``p50_vs_baseline`` (the plain p50 over the baseline's, which must stay within 5%),
``p50_vs_baseline_paired`` (the median over request cycles of plain / baseline
latency), ``cvr_off_p50_ms``, ``p50_vs_cvr_off``, ``cvr_off_vs_baseline``, and
what the baseline ran: ``baseline_code``, ``baseline_line``,
``baseline_model_config_diff`` (today's config against the baseline's),
``baseline_history_keys``, each server's swaps and mean swap time.

Usage::

    python benchmarks/serving.py                       # default EM3 config, 60 s
    python benchmarks/serving.py --explain             # + explanations and the pre-explanation baseline
    python benchmarks/serving.py --config tiny --duration 20
    python benchmarks/serving.py --server-arg=--rank-executor --server-arg=threads   # thread-pool mode

``--broker-outage-s S`` takes the broker away for ``S`` seconds, ``--outage-at-s``
into the load: ``--outage-mode kill`` SIGKILLs it and starts it again on the same
port after ``S`` seconds (on durable storage, ``em3 services up --durable``, since
a memory broker forgets every topic), ``pause`` freezes it (SIGSTOP, then
SIGCONT). Requests keep coming. Afterwards the benchmark waits until the server
holds no impression in flight (``em3_serving_impressions_in_flight``, sampled
every second during the run too), reads the impressions topic from the start and
counts by impression id: every impression of every answered request must be
there (``impressions_lost``); extra copies are ``impressions_duplicates``.

    python benchmarks/serving.py --broker-outage-s 10                     # kill + restart
    python benchmarks/serving.py --broker-outage-s 10 --outage-mode pause

The last line printed is one JSON object: ``rps``, ``p50_ms``, ``p99_ms``,
``model_forward_p50_ms``, ``overhead_ratio``, ``failed``, ``swaps_during_run``,
``impressions_lost``, ``impressions_duplicates``, ...
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402

from em3 import snapshot  # noqa: E402
from em3.config import KafkaSettings, RedisSettings, Settings, TopicNames  # noqa: E402
from em3.app.services import LocalServices, free_port  # noqa: E402
from em3.types import ItemContent  # noqa: E402
from stream.kafka import make_consumer  # noqa: E402

log = logging.getLogger("benchmarks.serving")
LINE = "bench"
BASELINE_LINE = "bench-baseline"  # the baseline's own line, published by its own code
CVR_OFF_LINE = "bench-cvr-off"  # this code, today's model without the CVR head


def _png(rng: np.random.Generator, size: int = 64) -> bytes:
    from PIL import Image

    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _catalog(n: int, seed: int) -> list[ItemContent]:
    rng = np.random.default_rng(seed)
    words = ["space", "love", "war", "comedy", "drama", "night", "city", "river", "ghost", "dance", "king",
             "summer", "detective", "robot", "island", "family", "secret", "storm", "road", "music"]
    items = []
    for i in range(n):
        title = " ".join(rng.choice(words, size=4)) + f" ({1950 + i % 70})"
        items.append(ItemContent(f"item-{i}", text=title, image=_png(rng), attributes={"year": str(1950 + i % 70)}))
    return items


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _publish(store, state, config, version_noise: float, rng: torch.Generator, line: str = LINE) -> int:
    version = store.next_version(line)
    noisy = {k: v + version_noise * torch.randn(v.shape, generator=rng) for k, v in state.items()}
    blob, manifest = snapshot.pack(noisy, model_line=line, version=version, config=config)
    store.publish(manifest, blob)
    return version


def _server_status(client: httpx.Client, line: str = LINE) -> dict:
    return client.get("/readyz").json()["sources"][line]


def _swap_counts(servers: dict[str, tuple[subprocess.Popen, int, Any]], lines: dict[str, str]
                 ) -> dict[str, tuple[int, float, float]]:
    """Per server (``lines``: server -> its line): swaps so far, and the sum and count
    of ``em3_serving_swap_seconds`` (load + precompute per swap)."""
    out = {}
    for name, (_, port, _) in servers.items():
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            page = c.get("/metrics").text
            out[name] = (int(_server_status(c, lines[name])["swaps"]), _metric(page, "em3_serving_swap_seconds_sum"),
                         _metric(page, "em3_serving_swap_seconds_count"))
    return out


def _swap_figures(before: dict[str, tuple[int, float, float]], after: dict[str, tuple[int, float, float]]) -> dict:
    """Each other server's swaps during the run, and every server's mean swap time then."""
    out = {}
    for name, (swaps, total, count) in after.items():
        b_swaps, b_total, b_count = before[name]
        prefix = "" if name == "server" else f"{name}_"
        if name != "server":
            out[f"{prefix}swaps_during_run"] = swaps - b_swaps
        if count > b_count:
            out[f"{prefix}swap_mean_ms"] = round((total - b_total) / (count - b_count) * 1e3, 1)
    return out


def _metric(text: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in a Prometheus text page (NaN if absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def _broker_outage(services: LocalServices, mode: str, seconds: float) -> dict:
    """Take the broker away for ``seconds`` (SIGKILL + restart, or SIGSTOP + SIGCONT)."""
    t0 = time.monotonic()
    if mode == "kill":
        services.restart_kafka(kill=True, down_s=seconds, timeout_s=60.0)
    else:
        pid = services.pids()["kafka"]
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
    log.warning("broker back after %.1f s (%s)", time.monotonic() - t0, mode)
    return {"mode": mode, "down_s": round(time.monotonic() - t0, 2)}


def _count_on_topic(kafka: KafkaSettings, topic: str, expected: set[str], idle_s: float,
                    timeout_s: float) -> dict[str, int]:
    """Read ``topic`` from the start; how many times each impression id occurs."""
    from em3 import codec

    # A long fetch wait: the durable broker reads one stored object per record batch,
    # and a fetch it cannot fill within fetch.wait.max.ms (50 ms in CONSUMER_DEFAULTS)
    # comes back empty, so a loaded broker returned nothing most of the time.
    consumer = make_consumer(kafka, f"bench-audit-{time.monotonic_ns()}", fetch_wait_max_ms=10000)
    consumer.subscribe([topic])
    counts: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            for msg in consumer.consume(5000, timeout=0.5):
                if msg.error() is not None:
                    continue
                imp_id = codec.decode_impression(msg.value()).impression_id
                counts[imp_id] = counts.get(imp_id, 0) + 1
                last = time.monotonic()
            if expected and expected <= counts.keys():
                idle_s = min(idle_s, 3.0)  # all found: only wait briefly for stray duplicates
    finally:
        consumer.close()
    return counts


def run(args: argparse.Namespace) -> dict:
    from em3.model import EM3Model, ModelConfig
    from em3.privacy import Pseudonymizer
    from em3.redis_stores import RedisContentStore, RedisHistoryStore, RedisSnapshotStore, connect
    from stream.kafka import ensure_topics

    config = ModelConfig() if args.config == "default" else ModelConfig.tiny()
    torch.manual_seed(args.seed)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="em3-bench-serving-"))
    durable = args.broker_storage == "durable" or (
        args.broker_storage == "auto" and args.broker_outage_s > 0 and args.outage_mode == "kill")
    outage: dict = {}
    in_flight: list[float] = []
    answered: set[str] = set()
    with LocalServices(run_dir / "services", durable=durable) as services:
        info = services.info
        settings = Settings(KafkaSettings(info.bootstrap_servers), RedisSettings(info.redis_url),
                            TopicNames("bench."), redis_prefix="bench:")
        ensure_topics(settings.kafka, settings.topics)
        redis = connect(settings.redis)
        items = _catalog(args.catalog, args.seed)
        RedisContentStore(redis, settings.redis_prefix).put_many(items)
        ids = [i.item_id for i in items]
        rnd = random.Random(args.seed)
        users = [f"user-{u}" for u in range(args.users)]
        history = RedisHistoryStore(redis, settings.redis_prefix)
        pseudonymize = Pseudonymizer(info.user_id_key)  # the server looks histories up by pseudonym
        clicks = []  # (user, item_id, clicked_at), raw user IDs
        for user in users:
            clicked = rnd.sample(ids, args.history)
            clicks += [(user, item_id, 1.7e9 + t) for t, item_id in enumerate(reversed(clicked))]
        history.append_many([(pseudonymize(user), item_id, at) for user, item_id, at in clicks])

        log.info("building the publisher's model (%s config)", args.config)
        model = EM3Model(config).eval()
        state = model.trainable_state_dict()
        store = RedisSnapshotStore(redis, settings.redis_prefix, keep=5, signing_key=info.snapshot_key)
        noise = torch.Generator().manual_seed(args.seed)
        first = _publish(store, state, config, 0.0, noise)
        objective = _objective(args.server_arg)
        # Today's model without the CVR head, beside the baseline: what the CVR head
        # costs plain requests (only with --explain, a CVR head, and ranking by ctr).
        cvr_off = None
        if args.explain and args.cvr_off_server and config.ctcvr_weight > 0 and objective == "ctr":
            torch.manual_seed(args.seed)
            cvr_off_config = config.replace(ctcvr_weight=0.0)
            cvr_off_state = EM3Model(cvr_off_config).eval().trainable_state_dict()
            cvr_off = (cvr_off_config, cvr_off_state, torch.Generator().manual_seed(args.seed))
            _publish(store, cvr_off_state, cvr_off_config, 0.0, cvr_off[2], CVR_OFF_LINE)

        # The bare model on the same input: 100 candidate rows against 100 history rows.
        user = pseudonymize(users[0])
        hist_ids = history.get(user, args.history)
        cand_ids = rnd.sample(ids, args.candidates)
        by_id = {i.item_id: i for i in items}
        with torch.inference_mode():
            t0 = time.perf_counter()
            reps = model.item_representations(hist_ids + cand_ids, [by_id[i] for i in hist_ids + cand_ids])
            rows_ms = (time.perf_counter() - t0) * 1e3 / len(reps)
            # What a swap pays per item: the frozen-prefix cache is warm, batches of 64 as the server's.
            all_ids = [i.item_id for i in items]
            model.item_representations(all_ids, items)
            t0 = time.perf_counter()
            for start in range(0, len(all_ids), 64):
                model.item_representations(all_ids[start:start + 64], items[start:start + 64])
            swap_rows_ms = (time.perf_counter() - t0) * 1e3 / len(all_ids)
        hist, cand = reps[: len(hist_ids)], reps[len(hist_ids):]
        forward: list[float] = []  # torch threads as the server's request threads
        forward_default: list[float] = []  # torch's default thread count
        default_threads = torch.get_num_threads()

        def bare_forward(reps_n: int, threads: int, out: list[float]) -> None:
            # In a worker thread, as the server's request threads run it.
            def body() -> None:
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    for n in range(reps_n + 3):
                        t0 = time.perf_counter()
                        model.score_candidates(user, {"device": "web"}, hist, cand)
                        if n >= 3:
                            out.append((time.perf_counter() - t0) * 1e3)

            worker = threading.Thread(target=body)
            worker.start()
            worker.join()

        servers: dict[str, tuple[subprocess.Popen, int, Any]] = {}  # name -> (process, port, log file)

        def start_server(name: str, code_dir: Path | None, line: str = LINE) -> None:
            port = free_port()
            log_file = open(run_dir / f"{name}.log", "wb")
            cmd = [sys.executable, "-m", "em3", "serve", "--model-line", line, "--port", str(port),
                   "--bootstrap-servers", info.bootstrap_servers, "--redis-url", info.redis_url,
                   "--topic-prefix", "bench.", "--redis-prefix", "bench:", "--poll-interval", "1.0"]
            cmd += ["--torch-threads", str(args.server_torch_threads)] + args.server_arg
            env = dict(os.environ, **info.env(), PYTHONUNBUFFERED="1")
            env.update(kv.split("=", 1) for kv in args.server_env)
            if code_dir is not None:  # `python -m` puts the cwd first on sys.path: run from the other tree
                env["PYTHONPATH"] = str(code_dir)
            servers[name] = (subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                              cwd=str(code_dir) if code_dir is not None else None),
                             port, log_file)

        def wait_ready(name: str) -> None:
            proc, port, _ = servers[name]
            deadline = time.monotonic() + args.start_timeout
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                while True:
                    try:
                        if c.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"server {name} did not become ready; see {run_dir / (name + '.log')}")
                    time.sleep(0.25)
            log.info("server %s ready on port %d", name, port)

        baseline_dir = _baseline_tree(args, run_dir) if args.explain else None
        baseline_line = LINE if args.baseline_snapshots == "shared" else BASELINE_LINE
        baseline_pub: dict[str, Any] = {}  # the baseline's publisher: process, ready line, last line
        # Requests rotate through the phases: the server without explanations ("plain"),
        # with "explain": true ("explain"), today's model without the CVR head
        # ("cvr_off"), the baseline server ("baseline"), so every phase sees the same
        # background and swaps.
        phases = (["plain"] + (["explain"] if args.explain else []) + (["cvr_off"] if cvr_off else [])
                  + (["baseline"] if baseline_dir else []))
        try:
            start_server("server", None)
            if args.explain and args.explain_on == "own":
                start_server("explain", None)
            if cvr_off is not None:
                start_server("cvr_off", None, CVR_OFF_LINE)
            if baseline_dir is not None:
                if baseline_line == BASELINE_LINE:
                    baseline_pub.update(_start_baseline_publisher(args, baseline_dir, run_dir, info, clicks))
                start_server("baseline", baseline_dir, baseline_line)
            port = servers["server"][1]
            url = f"http://127.0.0.1:{port}"
            phase_port = {"plain": port, "explain": port}
            phase_port.update({name: servers[name][1] for name in ("explain", "cvr_off", "baseline") if name in servers})
            with httpx.Client(base_url=url, timeout=30) as admin:
                for name in servers:
                    wait_ready(name)
                body = {"user_id": user, "item_ids": cand_ids, "context": {"device": "web"}, "k": 10}
                for phase in phases:
                    with httpx.Client(base_url=f"http://127.0.0.1:{phase_port[phase]}", timeout=30) as warm:
                        for _ in range(args.warmup):
                            answer = warm.post("/v1/rank", json={**body, **({"explain": True} if phase == "explain"
                                                                              else {})})
                            answer.raise_for_status()
                            if phase in ("plain", "explain"):
                                answered.update(i["impression_id"] for i in answer.json()["items"])
                swaps_before = _server_status(admin)["swaps"]
                server_lines = {"server": LINE, "explain": LINE, "cvr_off": CVR_OFF_LINE, "baseline": baseline_line}
                swaps_at_start = _swap_counts(servers, server_lines)

                latencies: dict[str, list[float]] = {phase: [] for phase in phases}
                versions: list[int] = []
                failures: list[str] = []
                lock = threading.Lock()
                stop = threading.Event()
                go = threading.Event()  # clients run only while set (the bare model runs while clear)
                cycles: list[dict[str, float]] = []  # one latency per phase, consecutive requests of a client

                def client_loop(seed: int) -> None:
                    crng = random.Random(seed)
                    order_rng, order = random.Random(seed + 7919), list(phases)
                    conns = {p: http.client.HTTPConnection("127.0.0.1", phase_port[p], timeout=30) for p in phases}
                    count, cycle = 0, {}
                    while not stop.is_set():
                        if not go.wait(0.1):
                            continue
                        # Requests rotate through the phases one by one, so each phase's
                        # requests see the same load as its neighbours'; each cycle in a
                        # new random order, so no phase always follows the same one.
                        if count % len(phases) == 0:
                            order_rng.shuffle(order)
                        phase = order[count % len(phases)]
                        count += 1
                        req = {"user_id": crng.choice(users), "item_ids": crng.sample(ids, args.candidates),
                               "context": {"device": "web"}, "k": 10}
                        if phase == "explain":
                            req["explain"] = True
                        payload = json.dumps(req).encode()
                        t0 = time.perf_counter()
                        try:
                            conns[phase].request("POST", "/v1/rank", body=payload,
                                                 headers={"Content-Type": "application/json"})
                            resp = conns[phase].getresponse()
                            data = resp.read()
                            ms = (time.perf_counter() - t0) * 1e3
                            ok, why = resp.status == 200, f"{phase}: {resp.status} {data[:200]!r}"
                        except (OSError, http.client.HTTPException) as exc:
                            ok, why, ms = False, f"{phase}: {exc!r}", 0.0
                            conns[phase].close()
                            conns[phase] = http.client.HTTPConnection("127.0.0.1", phase_port[phase], timeout=30)
                        with lock:
                            if ok:
                                if phase in ("plain", "explain"):  # the others log to the same topic too
                                    answered.update(i["impression_id"] for i in json.loads(data)["items"])
                                latencies[phase].append(ms)
                                cycle[phase] = ms
                                if len(cycle) == len(phases):
                                    cycles.append(cycle)
                                    cycle = {}
                                if phase == "plain":
                                    versions.append(json.loads(data)["model_version"])
                                if phase == "explain" and not all("explanation" in i for i in json.loads(data)["items"]):
                                    failures.append(f"explain: no explanation in {data[:200]!r}")
                            else:
                                failures.append(why)
                                cycle = {}
                    for conn in conns.values():
                        conn.close()

                published = [first]

                def publisher() -> None:
                    while not stop.wait(args.swap_interval):
                        published.append(_publish(store, state, config, 0.01, noise))
                        if cvr_off is not None:
                            _publish(store, cvr_off[1], cvr_off[0], 0.01, cvr_off[2], CVR_OFF_LINE)

                def monitor() -> None:
                    # The in-flight gauge, once a second (it rises while the broker is away).
                    with httpx.Client(base_url=url, timeout=10) as mon:
                        while not stop.wait(1.0):
                            try:
                                in_flight.append(_metric(mon.get("/metrics").text, "em3_serving_impressions_in_flight"))
                            except httpx.HTTPError:
                                pass

                def take_broker_away() -> None:
                    if not stop.wait(args.outage_at_s):
                        outage.update(_broker_outage(services, args.outage_mode, args.broker_outage_s))

                threads = [threading.Thread(target=client_loop, args=(args.seed + c,)) for c in range(args.concurrency)]
                pub = threading.Thread(target=publisher)
                side = [threading.Thread(target=monitor)]
                if args.broker_outage_s > 0:
                    side.append(threading.Thread(target=take_broker_away))
                t_start = time.perf_counter()
                for t in threads + side:
                    t.start()
                pub.start()
                if baseline_pub:  # the baseline's line swaps at the same interval from now on
                    baseline_pub["process"].stdin.write(b"go\n")
                    baseline_pub["process"].stdin.flush()
                # Interleave: a burst of bare-model forwards (clients paused), then a
                # round of load, so both see the same background load on a shared CPU.
                rounds = max(1, round(args.duration / args.round_s))
                per_round = max(1, args.forward_reps // rounds)
                load_s = 0.0
                for _ in range(rounds):
                    go.clear()
                    time.sleep(0.05)  # let in-flight requests finish
                    bare_forward(per_round, args.server_torch_threads or default_threads, forward)
                    bare_forward(max(1, per_round // 3), default_threads, forward_default)
                    go.set()
                    t_round = time.perf_counter()
                    time.sleep(args.round_s)
                    load_s += time.perf_counter() - t_round
                stop.set()
                go.set()
                for t in threads:
                    t.join(60)
                pub.join(60)
                if baseline_pub:
                    baseline_pub.update(_stop_baseline_publisher(baseline_pub["process"]))
                elapsed = time.perf_counter() - t_start
                for t in side:
                    t.join(120)  # an outage in progress ends first
                status = _server_status(admin)
                swap_figures = _swap_figures(swaps_at_start, _swap_counts(servers, server_lines))
                # Until the broker has acknowledged every impression the audited servers hold.
                drain_deadline = time.monotonic() + args.drain_timeout_s
                t_drain = time.monotonic()
                audited = [servers[name][1] for name in ("server", "explain") if name in servers]
                while True:
                    metrics = admin.get("/metrics").text
                    held = sum(_metric(httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text,
                                       "em3_serving_impressions_in_flight") for p in audited)
                    if held == 0 or time.monotonic() > drain_deadline:
                        break
                    time.sleep(0.5)
                drain_s = time.monotonic() - t_drain
        finally:
            if baseline_pub and baseline_pub["process"].poll() is None:
                baseline_pub["process"].kill()
                baseline_pub["process"].wait(10)
            for proc, _, log_file in servers.values():
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log_file.close()
            redis.close()
        t_audit = time.monotonic()
        on_topic = _count_on_topic(settings.kafka, settings.topics.impressions, answered, args.audit_idle_s,
                                   args.audit_timeout_s)
        audit_s = time.monotonic() - t_audit

    swaps = status["swaps"] - swaps_before
    plain = latencies["plain"]
    p50 = _percentile(plain, 50)
    server_threads_p50 = _percentile(forward, 50)
    default_p50 = _percentile(forward_default, 50)
    # The conservative reference: the faster of the two bare-model settings.
    model_forward_p50 = min(server_threads_p50, default_p50)
    drops = [line for line in metrics.splitlines() if line.startswith("em3_serving_impressions_dropped_total")]

    def metric(prefix: str) -> float:
        for line in metrics.splitlines():
            if line.startswith(prefix):
                return float(line.split()[-1])
        return float("nan")

    model_mean = metric("em3_serving_model_seconds_sum") / metric("em3_serving_model_seconds_count") * 1e3
    rank_key = 'em3_serving_request_seconds_{}{{endpoint="/v1/rank"}}'
    server_mean = metric(rank_key.format("sum")) / metric(rank_key.format("count")) * 1e3
    return {
        "benchmark": "serving",
        "variant": "em3" if args.config == "default" else "em3 (ModelConfig.tiny)",
        "runtime": f"em3 serve subprocess (uvicorn, rank in the event loop), CPU, {args.server_torch_threads} "
                   f"torch thread(s) per request; clients and bare model in this process",
        "config": args.config,
        "candidates": args.candidates,
        "history": args.history,
        "catalog": args.catalog,
        "concurrency": args.concurrency,
        "server_torch_threads": args.server_torch_threads,
        "server_env": args.server_env,
        "server_args": args.server_arg,
        "duration_s": round(elapsed, 2),
        "forward_samples": len(forward) + len(forward_default),
        "requests": len(plain),
        "load_s": round(load_s, 2),
        "rps": round(sum(len(v) for v in latencies.values()) / load_s, 2),
        "p50_ms": round(p50, 2),
        "p90_ms": round(_percentile(plain, 90), 2),
        "p99_ms": round(_percentile(plain, 99), 2),
        "model_forward_p50_ms": round(model_forward_p50, 2),
        "overhead_ratio": round(p50 / model_forward_p50, 3),
        "model_forward_p50_ms_server_threads": round(server_threads_p50, 2),
        "model_forward_p50_ms_default_threads": round(default_p50, 2),
        "default_threads": default_threads,
        "item_rows_per_item_ms": round(rows_ms, 2),
        "item_rows_warm_per_item_ms": round(swap_rows_ms, 2),
        "server_model_mean_ms": round(model_mean, 2),
        "server_rank_mean_ms": round(server_mean, 2),
        "client_mean_ms": round(float(np.mean(plain)), 2) if plain else None,
        "failed": len(failures),
        "failure_examples": failures[:3],
        "swaps_during_run": swaps,
        **swap_figures,
        "versions_published": len(published) - 1,
        "versions_served": len(set(versions)),
        "last_version_served": max(versions) if versions else None,
        "impressions_dropped": float(drops[0].split()[-1]) if drops else None,
        "broker_outage_s": args.broker_outage_s,
        "outage": outage or None,
        "broker_storage": "durable" if durable else "memory",
        "producer_idempotence": dict(os.environ, **info.env(), **dict(kv.split("=", 1) for kv in args.server_env)
                                     ).get("EM3_PRODUCER_IDEMPOTENCE", "on"),
        "impressions_answered": len(answered),
        "impressions_on_topic": sum(1 for i in answered if i in on_topic),
        "impressions_lost": sum(1 for i in answered if i not in on_topic),
        "impressions_duplicates": sum(on_topic[i] - 1 for i in answered if i in on_topic),
        "impressions_not_answered_on_topic": sum(1 for i in on_topic if i not in answered),
        "impressions_in_flight_max": max(in_flight) if in_flight else None,
        "impressions_in_flight_at_end": held,
        "drain_s": round(drain_s, 2),
        "audit_read_s": round(audit_s, 2),
        "targets_met": (len(failures) == 0 and p50 / model_forward_p50 <= 1.5 and swaps >= 10
                        and all(i in on_topic for i in answered)),
        "server_log": str(run_dir / "server.log"),
        **_explain_figures(args, latencies, cycles, p50),
        **_comparison(args, config, objective, baseline_dir, baseline_line, baseline_pub, cvr_off),
    }


#: The last commit before explanations existed: ``--explain`` runs its server as the
#: baseline (``--baseline-ref`` / ``--baseline-code`` choose another).
PRE_EXPLAIN_REF = "a529d5d"


def _baseline_tree(args: argparse.Namespace, run_dir: Path) -> Path | None:
    """The code the baseline server runs: ``--baseline-code``, or ``git archive`` of
    ``--baseline-ref`` unpacked under ``run_dir``; None for ``--baseline-ref none``."""
    if args.baseline_code:
        return Path(args.baseline_code).resolve()
    if args.baseline_ref.lower() == "none":
        return None
    root = Path(__file__).resolve().parents[1]
    out = run_dir / f"baseline-{args.baseline_ref}"
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", args.baseline_ref],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def _objective(server_args: list[str]) -> str:
    """The objective ``em3 serve`` ranks by with these extra flags (``ctr`` unless given)."""
    for n, arg in enumerate(server_args):
        if arg == "--objective" and n + 1 < len(server_args):
            return server_args[n + 1]
        if arg.startswith("--objective="):
            return arg.split("=", 1)[1]
    return "ctr"


def _start_baseline_publisher(args: argparse.Namespace, code_dir: Path, run_dir: Path, info,
                              clicks: list[tuple[str, str, float]]) -> dict[str, Any]:
    """Start ``benchmarks/publish_line.py`` on the baseline's code (``PYTHONPATH=code_dir``):
    it writes the histories where that code looks them up, publishes that code's model
    on :data:`BASELINE_LINE` and waits for "go"; returns its process and ready line."""
    rows = run_dir / "baseline-histories.json"
    rows.write_text(json.dumps(clicks))
    script = Path(__file__).resolve().parent / "publish_line.py"
    cmd = [sys.executable, str(script), "--redis-url", info.redis_url, "--redis-prefix", "bench:",
           "--line", BASELINE_LINE, "--config", args.config, "--seed", str(args.seed),
           "--swap-interval", str(args.swap_interval), "--histories", str(rows)]
    env = dict(os.environ, **info.env(), PYTHONPATH=str(code_dir), PYTHONUNBUFFERED="1")
    log_file = open(run_dir / "baseline-publisher.log", "wb")
    # The script's own folder is first on sys.path, then the baseline's tree: its em3.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env,
                            cwd=str(code_dir))
    log_file.close()
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"the baseline's publisher ended before its first snapshot; see "
                           f"{run_dir / 'baseline-publisher.log'}")
    ready = json.loads(line)
    log.info("baseline line %s: v%d from %s (%s config; histories by %s, %d written)", BASELINE_LINE,
             ready["version"], code_dir, args.config, ready["history_keys"], ready["histories_written"])
    return {"process": proc, "ready": ready}


def _stop_baseline_publisher(proc: subprocess.Popen) -> dict[str, Any]:
    """Close the publisher's stdin (it stops) and read its last line."""
    proc.stdin.close()
    out = proc.stdout.read().decode().strip().splitlines()
    proc.wait(30)
    return {"done": json.loads(out[-1]) if out else {}}


def _config_diff(current: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """How ``other`` differs from ``current``: keys only in one, and changed values."""
    return {"only_current": {k: current[k] for k in sorted(current.keys() - other.keys())},
            "only_baseline": {k: other[k] for k in sorted(other.keys() - current.keys())},
            "changed": {k: [current[k], other[k]] for k in sorted(current.keys() & other.keys())
                        if current[k] != other[k]}}


def _comparison(args: argparse.Namespace, config, objective: str, baseline_dir: Path | None, baseline_line: str,
                baseline_pub: dict[str, Any], cvr_off) -> dict:
    """What the ``--explain`` comparison ran: the baseline's code, line and model, and
    today's model's CVR head (whether plain requests pay for it)."""
    if not args.explain:
        return {}
    current = snapshot.config_dict(config)
    out: dict[str, Any] = {
        "explain_on": ("its own server (this code, the same line and swaps): the plain server answers only plain "
                       "requests" if args.explain_on == "own" else "the plain server (requests alternate)"),
        "objective": objective,
        "cvr_head": config.ctcvr_weight > 0,
        "cvr_head_on_plain_requests": (
            "runs" if objective != "ctr" and config.ctcvr_weight > 0 else
            "head not run (ranking by ctr returns the click logit before it); the item rows each request composes "
            "carry zeros in the 2 CVR columns, which ctr does not read"
            if config.ctcvr_weight > 0 else "no CVR head"),
    }
    if cvr_off is not None:
        out["cvr_off_line"] = CVR_OFF_LINE
        out["cvr_off_config_diff"] = _config_diff(current, snapshot.config_dict(cvr_off[0]))["changed"]
    if baseline_dir is None:
        return out
    out["baseline_code"] = str(baseline_dir) if args.baseline_code else f"git archive {args.baseline_ref}"
    out["baseline_line"] = baseline_line
    if baseline_pub:
        ready = baseline_pub["ready"]
        out["baseline_snapshots"] = (f"own line, published by the baseline's code ({args.config} model, seed "
                                     f"{args.seed}, a version every {args.swap_interval} s)")
        out["baseline_model_config_diff"] = _config_diff(current, ready["config"])
        out["baseline_history_keys"] = ready["history_keys"]
        out["baseline_histories_written"] = ready["histories_written"]
        out["baseline_versions_published"] = baseline_pub.get("done", {}).get("published")
    else:
        out["baseline_snapshots"] = "shared: this benchmark's line and snapshots (today's model)"
        out["baseline_model_config_diff"] = _config_diff(current, current)
    return out


def _explain_figures(args: argparse.Namespace, latencies: dict[str, list[float]], cycles: list[dict[str, float]],
                     p50: float) -> dict:
    """``--explain`` figures: explained requests' latency, and the plain requests' p50
    against the baseline server's in the same run; also the median over request
    cycles (consecutive requests, one per phase) of each cycle's latency ratio, which
    cancels load that changes more slowly than a cycle."""
    if not args.explain:
        return {}

    def paired(a: str, b: str) -> float | None:
        ratios = [c[a] / c[b] for c in cycles if a in c and b in c and c[b] > 0]
        return round(float(np.median(ratios)), 4) if ratios else None

    out = {"explain_requests": len(latencies["explain"]),
           "explain_p50_ms": round(_percentile(latencies["explain"], 50), 2),
           "explain_p99_ms": round(_percentile(latencies["explain"], 99), 2),
           "cycles": len(cycles), "explain_vs_plain_paired": paired("explain", "plain")}
    base = latencies.get("baseline")
    if base is not None:
        base_p50 = _percentile(base, 50)
        out.update({"baseline": args.baseline_code or args.baseline_ref, "baseline_requests": len(base),
                    "baseline_p50_ms": round(base_p50, 2), "baseline_p99_ms": round(_percentile(base, 99), 2),
                    "p50_vs_baseline": round(p50 / base_p50, 4),
                    "p50_vs_baseline_paired": paired("plain", "baseline"),
                    "p50_within_5pct_of_baseline": p50 <= 1.05 * base_p50})
    off = latencies.get("cvr_off")
    if off is not None:
        off_p50 = _percentile(off, 50)
        out.update({"cvr_off_requests": len(off), "cvr_off_p50_ms": round(off_p50, 2),
                    "cvr_off_p99_ms": round(_percentile(off, 99), 2),
                    "p50_vs_cvr_off": round(p50 / off_p50, 4), "p50_vs_cvr_off_paired": paired("plain", "cvr_off")})
        if base is not None:
            out.update({"cvr_off_vs_baseline": round(off_p50 / base_p50, 4),
                        "cvr_off_vs_baseline_paired": paired("cvr_off", "baseline")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["default", "tiny"], default="default")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--swap-interval", type=float, default=4.0, help="seconds between published snapshots")
    p.add_argument("--concurrency", type=int, default=1, help="closed-loop clients")
    p.add_argument("--catalog", type=int, default=300, help="registered items (text + image)")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--forward-reps", type=int, default=300, help="bare-model forwards, spread over the rounds")
    p.add_argument("--round-s", type=float, default=3.0, help="seconds of load between bare-model bursts")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-torch-threads", type=int, default=1,
                   help="em3 serve --torch-threads, also used for the bare-model forwards (0: torch's default)")
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server process")
    p.add_argument("--server-arg", action="append", default=[], help="extra em3 serve flag (repeat per token)")
    p.add_argument("--explain", action="store_true",
                   help="rotate plain requests, requests with \"explain\": true, and plain requests to a baseline "
                        "server running the code before explanations; report explain_p50_ms and the plain p50 "
                        "against the baseline's")
    p.add_argument("--baseline-ref", default=PRE_EXPLAIN_REF,
                   help=f"git ref whose code the baseline server runs with --explain (default {PRE_EXPLAIN_REF}, the "
                        "last commit before explanations; 'none' for no baseline)")
    p.add_argument("--baseline-code", default=None, help="a source tree for the baseline server instead of a ref")
    p.add_argument("--baseline-snapshots", choices=["own", "shared"], default="own",
                   help="own: the baseline serves its own line, published by its own code (benchmarks/publish_line.py "
                        "on the baseline's tree: its default model, same seed and swap interval); shared: it serves "
                        "this benchmark's line (only for a baseline that reads today's snapshots)")
    p.add_argument("--explain-on", choices=["own", "same"], default="own",
                   help="own: explained requests go to a second server of this code on the same line, so the plain "
                        "server answers only plain requests, as the baseline does; same: to the plain server")
    p.add_argument("--cvr-off-server", action=argparse.BooleanOptionalAction, default=True,
                   help="with --explain, a model with a CVR head and the ctr objective: also serve today's model "
                        "without the CVR head (ctcvr_weight 0, its own line) in the rotation")
    p.add_argument("--broker-outage-s", type=float, default=0.0,
                   help="take the broker away this long during the load (0: no outage)")
    p.add_argument("--outage-mode", choices=["kill", "pause"], default="kill",
                   help="kill: SIGKILL, then a restart on the same port; pause: SIGSTOP, then SIGCONT")
    p.add_argument("--outage-at-s", type=float, default=15.0, help="seconds into the load when the outage starts")
    p.add_argument("--broker-storage", choices=["auto", "memory", "durable"], default="auto",
                   help="auto: durable for a kill outage (a memory broker forgets every topic), else memory")
    p.add_argument("--drain-timeout-s", type=float, default=120.0,
                   help="longest wait for the server to have no impression in flight after the load")
    p.add_argument("--audit-idle-s", type=float, default=60.0, help="stop reading the topic after this long idle")
    p.add_argument("--audit-timeout-s", type=float, default=600.0)
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.broker_outage_s > 0 and args.outage_at_s + args.broker_outage_s >= args.duration:
        p.error(f"the outage must end before the load does: --outage-at-s + --broker-outage-s < --duration "
                f"({args.duration}), but {args.outage_at_s} + {args.broker_outage_s} are given")
    if args.catalog < args.candidates or args.catalog < args.history:
        p.error(f"--catalog must be >= --candidates and --history, but {args.catalog} is given")
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
