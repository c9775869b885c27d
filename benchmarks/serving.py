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

Usage::

    python benchmarks/serving.py                       # default EM3 config, 60 s
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

        port = free_port()
        server_log = open(run_dir / "server.log", "wb")
        cmd = [sys.executable, "-m", "em3", "serve", "--model-line", LINE, "--port", str(port),
               "--bootstrap-servers", info.bootstrap_servers, "--redis-url", info.redis_url,
               "--topic-prefix", "bench.", "--redis-prefix", "bench:", "--poll-interval", "1.0"]
        cmd += ["--torch-threads", str(args.server_torch_threads)] + args.server_arg
        server_env = dict(os.environ, **info.env(), PYTHONUNBUFFERED="1")
        server_env.update(kv.split("=", 1) for kv in args.server_env)
        server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT,
                                  env=server_env)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=30) as admin:
                deadline = time.monotonic() + args.start_timeout
                while True:
                    try:
                        if admin.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"server did not become ready; see {run_dir / 'server.log'}")
                    time.sleep(0.25)
                log.info("server ready on %s", url)
                body = {"user_id": user, "item_ids": cand_ids, "context": {"device": "web"}, "k": 10}
                for _ in range(args.warmup):
                    admin.post("/v1/rank", json=body).raise_for_status()
                swaps_before = _server_status(admin)["swaps"]

                latencies: list[float] = []
                versions: list[int] = []
                failures: list[str] = []
                lock = threading.Lock()
                stop = threading.Event()
                go = threading.Event()  # clients run only while set (the bare model runs while clear)

                def client_loop(seed: int) -> None:
                    crng = random.Random(seed)
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    while not stop.is_set():
                        if not go.wait(0.1):
                            continue
                        req = json.dumps({"user_id": crng.choice(users), "item_ids": crng.sample(ids, args.candidates),
                                          "context": {"device": "web"}, "k": 10}).encode()
                        t0 = time.perf_counter()
                        try:
                            conn.request("POST", "/v1/rank", body=req, headers={"Content-Type": "application/json"})
                            resp = conn.getresponse()
                            data = resp.read()
                            ms = (time.perf_counter() - t0) * 1e3
                            ok, why = resp.status == 200, f"{resp.status} {data[:200]!r}"
                        except (OSError, http.client.HTTPException) as exc:
                            ok, why, ms = False, repr(exc), 0.0
                            conn.close()
                            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                        with lock:
                            if ok:
                                latencies.append(ms)
                                versions.append(json.loads(data)["model_version"])
                            else:
                                failures.append(why)
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
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
            server_log.close()
            redis.close()

    swaps = status["swaps"] - swaps_before
    p50 = _percentile(latencies, 50)
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
        "requests": len(latencies),
        "load_s": round(load_s, 2),
        "rps": round(len(latencies) / load_s, 2),
        "p50_ms": round(p50, 2),
        "p90_ms": round(_percentile(latencies, 90), 2),
        "p99_ms": round(_percentile(latencies, 99), 2),
        "model_forward_p50_ms": round(model_forward_p50, 2),
        "overhead_ratio": round(p50 / model_forward_p50, 3),
        "model_forward_p50_ms_server_threads": round(server_threads_p50, 2),
        "model_forward_p50_ms_default_threads": round(default_p50, 2),
        "default_threads": default_threads,
        "item_rows_per_item_ms": round(rows_ms, 2),
        "item_rows_warm_per_item_ms": round(swap_rows_ms, 2),
        "server_model_mean_ms": round(model_mean, 2),
        "server_rank_mean_ms": round(server_mean, 2),
        "client_mean_ms": round(float(np.mean(latencies)), 2) if latencies else None,
        "failed": len(failures),
        "failure_examples": failures[:3],
        "swaps_during_run": swaps,
        "versions_published": len(published) - 1,
        "versions_served": len(set(versions)),
        "last_version_served": max(versions) if versions else None,
        "impressions_dropped": float(drops[0].split()[-1]) if drops else None,
        "targets_met": len(failures) == 0 and p50 / model_forward_p50 <= 1.5 and swaps >= 10,
        "server_log": str(run_dir / "server.log"),
    }


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
