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

``--explain`` measures what explanations cost: each client's requests rotate, one by
one, between a plain request, a request with ``"explain": true`` to the same server,
and a plain request to a second ``em3 serve`` running the code before explanations
existed (``git archive`` of ``--baseline-ref``, default :data:`PRE_EXPLAIN_REF`) on
the same Redis, snapshots and swaps, so the three see the same load. It adds
``explain_p50_ms``, ``baseline_p50_ms`` and ``p50_vs_baseline`` (the plain p50 over
the baseline's, which must stay within 5%), and ``p50_vs_baseline_paired``, the median
over request cycles of plain / baseline latency.

Usage::

    python benchmarks/serving.py                       # default EM3 config, 60 s
    python benchmarks/serving.py --explain             # + explanations and the pre-explanation baseline
    python benchmarks/serving.py --config tiny --duration 20
    python benchmarks/serving.py --server-arg=--rank-executor --server-arg=threads   # thread-pool mode

The last line printed is one JSON object: ``rps``, ``p50_ms``, ``p99_ms``,
``model_forward_p50_ms``, ``overhead_ratio``, ``failed``, ``swaps_during_run``, ...
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import random
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

log = logging.getLogger("benchmarks.serving")
LINE = "bench"


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


def _publish(store, state, config, version_noise: float, rng: torch.Generator) -> int:
    version = store.next_version(LINE)
    noisy = {k: v + version_noise * torch.randn(v.shape, generator=rng) for k, v in state.items()}
    blob, manifest = snapshot.pack(noisy, model_line=LINE, version=version, config=config)
    store.publish(manifest, blob)
    return version


def _server_status(client: httpx.Client) -> dict:
    return client.get("/readyz").json()["sources"][LINE]


def run(args: argparse.Namespace) -> dict:
    from em3.model import EM3Model, ModelConfig
    from em3.privacy import Pseudonymizer
    from em3.redis_stores import RedisContentStore, RedisHistoryStore, RedisSnapshotStore, connect
    from stream.kafka import ensure_topics

    config = ModelConfig() if args.config == "default" else ModelConfig.tiny()
    torch.manual_seed(args.seed)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="em3-bench-serving-"))
    with LocalServices(run_dir / "services") as services:
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
        for user in users:
            clicked = rnd.sample(ids, args.history)
            history.append_many([(pseudonymize(user), item_id, 1.7e9 + t)
                                 for t, item_id in enumerate(reversed(clicked))])

        log.info("building the publisher's model (%s config)", args.config)
        model = EM3Model(config).eval()
        state = model.trainable_state_dict()
        store = RedisSnapshotStore(redis, settings.redis_prefix, keep=5, signing_key=info.snapshot_key)
        noise = torch.Generator().manual_seed(args.seed)
        first = _publish(store, state, config, 0.0, noise)

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

        def start_server(name: str, code_dir: Path | None) -> None:
            port = free_port()
            log_file = open(run_dir / f"{name}.log", "wb")
            cmd = [sys.executable, "-m", "em3", "serve", "--model-line", LINE, "--port", str(port),
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
        # Each round of load runs one phase: the server without explanations ("plain"),
        # with "explain": true ("explain"), the baseline server ("baseline"); rounds
        # rotate through them, so every phase sees the same background and swaps.
        phases = ["plain"] + (["explain"] if args.explain else []) + (["baseline"] if baseline_dir else [])
        try:
            start_server("server", None)
            if baseline_dir is not None:
                start_server("baseline", baseline_dir)
            port = servers["server"][1]
            url = f"http://127.0.0.1:{port}"
            phase_port = {"plain": port, "explain": port,
                          "baseline": servers["baseline"][1] if baseline_dir else port}
            with httpx.Client(base_url=url, timeout=30) as admin:
                for name in servers:
                    wait_ready(name)
                body = {"user_id": user, "item_ids": cand_ids, "context": {"device": "web"}, "k": 10}
                for phase in phases:
                    with httpx.Client(base_url=f"http://127.0.0.1:{phase_port[phase]}", timeout=30) as warm:
                        for _ in range(args.warmup):
                            warm.post("/v1/rank", json={**body, **({"explain": True} if phase == "explain" else {})
                                                        }).raise_for_status()
                swaps_before = _server_status(admin)["swaps"]

                latencies: dict[str, list[float]] = {phase: [] for phase in phases}
                versions: list[int] = []
                failures: list[str] = []
                lock = threading.Lock()
                stop = threading.Event()
                go = threading.Event()  # clients run only while set (the bare model runs while clear)
                cycles: list[dict[str, float]] = []  # one latency per phase, consecutive requests of a client

                def client_loop(seed: int) -> None:
                    crng = random.Random(seed)
                    conns = {p: http.client.HTTPConnection("127.0.0.1", phase_port[p], timeout=30) for p in phases}
                    count, cycle = 0, {}
                    while not stop.is_set():
                        if not go.wait(0.1):
                            continue
                        # Requests rotate through the phases one by one, so each phase's
                        # requests see the same load as its neighbours'.
                        phase = phases[count % len(phases)]
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

                threads = [threading.Thread(target=client_loop, args=(args.seed + c,)) for c in range(args.concurrency)]
                pub = threading.Thread(target=publisher)
                t_start = time.perf_counter()
                for t in threads:
                    t.start()
                pub.start()
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
                elapsed = time.perf_counter() - t_start
                status = _server_status(admin)
                metrics = admin.get("/metrics").text
        finally:
            for proc, _, log_file in servers.values():
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log_file.close()
            redis.close()

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
        "versions_published": len(published) - 1,
        "versions_served": len(set(versions)),
        "last_version_served": max(versions) if versions else None,
        "impressions_dropped": float(drops[0].split()[-1]) if drops else None,
        "targets_met": len(failures) == 0 and p50 / model_forward_p50 <= 1.5 and swaps >= 10,
        "server_log": str(run_dir / "server.log"),
        **_explain_figures(args, latencies, cycles, p50),
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
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.catalog < args.candidates or args.catalog < args.history:
        p.error(f"--catalog must be >= --candidates and --history, but {args.catalog} is given")
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
