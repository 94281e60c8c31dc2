"""What a replica mechanism costs: start-up and per-request overhead of the same pipeline run
in this process, in local child processes (service.worker) and through Ray Serve (service.ray_serve).

    python -m zimage.bench.replica_overhead --model tiny --device cpu            # this CPU box
    python -m zimage.bench.replica_overhead --model DIR --replicas 2 --ray local  # a GPU box

Each mechanism starts N replicas (1 in-process), then runs `--requests` jobs one after the other
(the per-request overhead: the wall time of a job minus the time the replica itself measured) and
`--requests` jobs from N threads at once (throughput). One JSON line per mechanism, then a table.
`--ray ADDRESS` uses a running cluster instead of a private one (`--ray local`); `--only` picks
mechanisms. Through the real server (16 requests from 8 clients) the benchmark is `bench`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from typing import Any


def _request(args: argparse.Namespace, seed: int):
    from zimage.service.request import GenerationRequest

    return GenerationRequest(
        prompt="a lighthouse at dusk", width=args.size, height=args.size, steps=args.steps, seed=seed
    )


def _measure(pool: Any, args: argparse.Namespace, size: int) -> dict[str, Any]:
    from zimage.service.jobs import Job

    pool.run(_request(args, 0), Job(), None)  # first job: any lazy set-up (Ray's router, the pipe)
    walls, inner = [], []
    for i in range(args.requests):
        t0 = time.perf_counter()
        result = pool.run(_request(args, 1 + i), Job(), lambda *_: None)
        walls.append(time.perf_counter() - t0)
        inner.append(result.timings.gpu_total)
    errors: list[BaseException] = []
    todo = list(range(args.requests * size))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                seed = 100 + todo.pop()
            try:
                pool.run(_request(args, seed), Job(), None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {
        "request_s": round(statistics.median(walls), 4),
        "replica_s": round(statistics.median(inner), 4),
        "overhead_ms": round(1000 * statistics.median(w - i for w, i in zip(walls, inner)), 1),
        "jobs_per_s": round(args.requests * size / wall, 3),
    }


def _local(settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    from zimage.ops.metrics import EngineMetrics
    from zimage.ops.profiler import LoadTimeline
    from zimage.service.replicas import LocalReplica, ReplicaPool

    t0 = time.perf_counter()
    pool = ReplicaPool([LocalReplica("local", settings, EngineMetrics(), LoadTimeline())])
    pool.start()
    row = {"mechanism": "in-process", "replicas": 1, "start_s": round(time.perf_counter() - t0, 2)}
    row.update(_measure(pool, args, 1))
    pool.close()
    return row


def _processes(settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    from zimage.ops.metrics import EngineMetrics
    from zimage.ops.profiler import LoadTimeline
    from zimage.service.layout import build_replicas, plan_replicas
    from zimage.service.replicas import ReplicaPool

    s = settings.replace(replicas=str(args.replicas))
    t0 = time.perf_counter()
    plan = plan_replicas(s)
    pool = ReplicaPool(build_replicas(s, plan, EngineMetrics(), LoadTimeline(), None))
    pool.start()
    row = {"mechanism": "processes", "replicas": plan.size, "start_s": round(time.perf_counter() - t0, 2)}
    row.update(_measure(pool, args, plan.size))
    pool.close()
    return row


def _ray(settings: Any, args: argparse.Namespace) -> dict[str, Any]:
    from zimage.ops.profiler import LoadTimeline
    from zimage.service.ray_serve import RayPool

    s = settings.replace(ray=args.ray, ray_replicas=str(args.replicas))
    tl = LoadTimeline()
    t0 = time.perf_counter()
    pool = RayPool(s, tl)
    pool.start()
    stages = {st.name: round(st.duration or 0.0, 2) for st in tl.stages}
    row = {
        "mechanism": f"ray ({args.ray})",
        "replicas": args.replicas,
        "start_s": round(time.perf_counter() - t0, 2),
        "connect_s": stages.get("connect to Ray"),
        "deploy_s": stages.get("start replicas on Ray Serve"),
    }
    row.update(_measure(pool, args, args.replicas))
    t0 = time.perf_counter()
    pool.close()
    row["close_s"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    import logging

    from zimage.settings import Settings

    p = argparse.ArgumentParser(prog="python -m zimage.bench.replica_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--tiny-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--ray", default="local", help="local (a private Ray of this process) or a cluster address")
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--only", default="in-process,processes,ray")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    kw: dict[str, Any] = dict(model=args.model, device=args.device, min_size=64, warmup=True)
    if args.tiny_dir:
        kw["tiny_dir"] = args.tiny_dir
    settings = Settings(**kw)
    runs = {"in-process": _local, "processes": _processes, "ray": _ray}
    rows = []
    for name in [x.strip() for x in args.only.split(",") if x.strip()]:
        row = runs[name](settings, args)
        row.update(size=args.size, steps=args.steps)
        print("REPLICA_OVERHEAD " + json.dumps(row), flush=True)
        rows.append(row)
        gc.collect()
        if "torch" in sys.modules:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    keys = ["mechanism", "replicas", "start_s", "request_s", "replica_s", "overhead_ms", "jobs_per_s"]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
