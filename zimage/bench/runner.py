"""`python -m zimage bench`: loading and generation, zimage against plain diffusers, in one run.

    python -m zimage bench build --model DIR            # full-size random-weight model (GPU box)
    python -m zimage bench run --model DIR --rows ROW,ROW --out FILE
    python -m zimage bench row ...                      # one row, in the current (fresh) process
    python -m zimage bench probe --model DIR            # weight-read throughput, import times
    python -m zimage bench explore --model DIR          # per-stage options: attention, compile, ...

`run` starts every row in a fresh process, with the page cache dropped ("cold") or left warm,
and the compile cache emptied ("first start") or kept. Each row prints one JSON line; `run`
collects them into a table and a JSON file with the device name and library versions.
Timing targets live here, never in unit tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zimage.bench.common import MARK, PROMPT, drop_caches, emit, versions

# name -> how to run it. page: cold (page cache dropped) or warm; cache: empty / keep (compile cache)
ROWS: dict[str, dict[str, Any]] = {
    "plain-cold": {"kind": "plain", "page": "cold"},
    "plain-warm": {"kind": "plain", "page": "warm"},
    "plain-compiled": {"kind": "plain", "variant": "compiled", "page": "warm"},
    "plain-model-offload": {"kind": "plain", "variant": "model-offload", "page": "warm", "runs": 2},
    "plain-group-offload": {"kind": "plain", "variant": "group-offload", "page": "warm", "runs": 3},
    "app-first": {"kind": "app", "page": "cold", "cache": "empty"},
    "app-cold": {"kind": "app", "page": "cold", "cache": "keep"},
    "app-warm": {"kind": "app", "page": "warm", "cache": "keep"},
    "zimage-first": {"kind": "zimage", "page": "cold", "cache": "empty"},
    "zimage-cold": {"kind": "zimage", "page": "cold", "cache": "keep"},
    "zimage-warm": {"kind": "zimage", "page": "warm", "cache": "keep"},
    "zimage-balanced-16g": {
        "kind": "zimage",
        "page": "warm",
        "cache": "keep",
        "settings": {"memory_mode": "balanced"},
        "cap_gib": 16,
    },
    # image to image vs text to image, LoRA switching and its recompiles (zimage/bench/toolbox.py)
    "zimage-toolbox": {"kind": "toolbox", "page": "warm", "cache": "keep"},
    "zimage-lowvram-8g": {
        "kind": "zimage",
        "page": "warm",
        "cache": "keep",
        "settings": {"memory_mode": "lowvram"},
        "cap_gib": 8,
    },
}


# ------------------------------------------------------------------------------------------
# orchestration


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model)
    files = sorted(model.rglob("*.safetensors"))
    workdir = Path(args.workdir)
    cache = workdir / "inductor"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": versions(), "size": args.size, "steps": args.steps, "prompt": PROMPT, "rows": {}}
    for name in [r for r in args.rows.split(",") if r]:
        spec = ROWS[name]
        left = args.deadline - time.time() if args.deadline else None
        if left is not None and left < args.min_left:
            results["rows"][name] = {"skipped": f"only {left:.0f}s left before the deadline"}
            print(f"{name}: skipped ({left:.0f}s left)", flush=True)
            continue
        row_timeout = min(args.row_timeout, left - 10) if left is not None else args.row_timeout
        if spec.get("cache") == "empty" and cache.exists():
            shutil.rmtree(cache)
        method = drop_caches(files) if spec["page"] == "cold" else "warm"
        if spec["page"] == "warm":
            for f in files:
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
        if spec["kind"] == "app":
            results["rows"][name] = _app(args, spec, name, model, workdir, cache, method, row_timeout)
            _write(args, results)
            continue
        cmd = [
            sys.executable,
            "-m",
            "zimage",
            "bench",
            "row",
            "--kind",
            spec["kind"],
            "--model",
            str(model),
            "--size",
            str(args.size),
            "--steps",
            str(args.steps),
            "--runs",
            str(spec.get("runs", args.runs)),
            "--workdir",
            str(workdir / name),
            "--compile-cache",
            str(cache),
        ]
        if spec.get("variant"):
            cmd += ["--variant", spec["variant"]]
        if spec.get("settings"):
            cmd += ["--settings", json.dumps(spec["settings"])]
        if spec.get("cap_gib"):
            cmd += ["--cap-gib", str(spec["cap_gib"])]
        if args.also_nine:
            cmd += ["--also-nine"]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=row_timeout)
        except subprocess.TimeoutExpired as exc:
            results["rows"][name] = {"page_cache": method, "error": f"timed out after {row_timeout:.0f}s"}
            print(f"{name}: timed out ({exc.timeout:.0f}s)", flush=True)
            _write(args, results)
            continue
        wall = time.perf_counter() - t
        row: dict[str, Any] = {
            "page_cache": method,
            "compile_cache": spec.get("cache"),
            "process_wall_s": round(wall, 2),
        }
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
        if proc.returncode == 0 and lines:
            row.update(json.loads(lines[-1][len(MARK) :]))
        else:
            row["error"] = (proc.stderr or proc.stdout)[-3000:]
        results["rows"][name] = row
        print(f"{name}: {json.dumps(row)[:1500]}", flush=True)
        _write(args, results)
    print(table(results))
    print(app_table(results))
    return results


def _write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


def _app(args, spec, name, model: Path, workdir: Path, cache: Path, method: str, timeout: float) -> dict[str, Any]:
    """A row through the real app (zimage.bench.app_rows), from this process."""
    from zimage.bench.app_rows import app_row

    row: dict[str, Any] = {"page_cache": method, "compile_cache": spec.get("cache")}
    t = time.perf_counter()
    try:
        row.update(
            app_row(
                str(model),
                workdir / name,
                cache,
                args.size,
                args.steps,
                warm_images=args.runs,
                timeout=timeout,
            )
        )
    except Exception as exc:  # noqa: BLE001 - a failed row is a result; the run goes on
        row["error"] = f"{type(exc).__name__}: {exc}"
        log = workdir / name / "app.log"
        if log.is_file():
            row["log_tail"] = log.read_text(errors="replace")[-3000:]
    row["process_wall_s"] = round(time.perf_counter() - t, 2)
    print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'images'})[:1500]}", flush=True)
    return row


def app_table(results: dict[str, Any]) -> str:
    rows = {n: r for n, r in results["rows"].items() if n.startswith("app-")}
    if not rows:
        return ""
    lines = [
        "",
        "| row (real app) | page up | /ready = 200 | first image | full speed | first image latency | "
        "eager latency | warm latency (median) | warm engine (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x):
        return "-" if x is None else f"{x:.2f} s" if isinstance(x, (int, float)) else str(x)

    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:100]} |")
            continue
        cells = [
            r.get("page_up_s"),
            r.get("ready_s"),
            r.get("first_image_s"),
            r.get("full_speed_s"),
            r.get("first_image_latency_s"),
            r.get("eager_latency_s"),
            r.get("warm_latency_median_s"),
            r.get("warm_engine_median_s"),
        ]
        lines.append(f"| {name} | " + " | ".join(f(c) for c in cells) + " |")
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    env = results["env"]
    lines = [
        f"{env.get('device')} | torch {env.get('torch')} | diffusers {env.get('diffusers')} | "
        f"transformers {env.get('transformers')} | {results['size']}px, {results['steps']} steps",
        "",
        "| row | start -> ready | first image | start -> first image | warm image (median) | text | denoise | VAE | "
        "request -> PNG | peak VRAM alloc | mode |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, unit="s"):
        return "-" if x is None else f"{x:.3f} {unit}" if isinstance(x, float) else str(x)

    for name, r in results["rows"].items():
        if name.startswith("app-"):
            continue
        if "error" in r:
            lines.append(
                f"| {name} | error: {r['error'].strip().splitlines()[-1][:80] if r['error'].strip() else '?'} |"
            )
            continue
        sp = r.get("split", {})
        ws = r.get("with_saving", {})
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f(r.get("start_to_ready_s")),
                    f(r.get("first_image_s")),
                    f(r.get("start_to_first_image_s")),
                    f(r.get("warm_median_s")),
                    f(sp.get("text_encoder_s")),
                    f(sp.get("denoise_s")),
                    f(sp.get("vae_decode_s")),
                    f(ws.get("request_to_png_alone_s")),
                    f(r.get("peak_allocated_gib"), "GiB"),
                    str(r.get("memory_mode") or "plain"),
                ]
            )
            + " |"
        )
    from zimage.bench.toolbox import summary_lines

    return "\n".join(lines + summary_lines(results))


# ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zimage bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="Model folder (diffusers layout).")
    common.add_argument("--size", type=int, default=1024)
    common.add_argument("--steps", type=int, default=8)
    common.add_argument("--runs", type=int, default=5, help="Warm images per row (median).")
    common.add_argument("--workdir", default=".bench/work")
    common.add_argument("--compile-cache", default=".bench/work/inductor")
    b = sub.add_parser("build", parents=[common], help="Write the full-size random-weight model.")
    b.add_argument("--device", default="cuda")
    r = sub.add_parser("run", parents=[common], help="Run rows, each in a fresh process.")
    r.add_argument("--rows", default=",".join(ROWS))
    r.add_argument("--out", default=None, help="JSON file for the results.")
    r.add_argument("--row-timeout", type=float, default=560)
    r.add_argument("--also-nine", action="store_true", help="Plain rows also time 9 steps.")
    r.add_argument("--deadline", type=float, default=0, help="Epoch seconds: start no row after it (0: none).")
    r.add_argument("--min-left", type=float, default=60, help="Skip a row with less than this left.")
    w = sub.add_parser("row", parents=[common], help="One row in this process (used by run).")
    w.add_argument("--kind", choices=("plain", "zimage", "toolbox"), required=True)
    w.add_argument("--variant", default="")
    w.add_argument("--settings", default="")
    w.add_argument("--cap-gib", type=float, default=0)
    w.add_argument("--also-nine", action="store_true")
    sub.add_parser("probe", parents=[common], help="Weight-read throughput.")
    sub.add_parser("explore", parents=[common], help="Stage options in one process.")
    sub.add_parser("imports", parents=[common], help="The app's import time (-X importtime log to --workdir).")
    sub.add_parser("table", parents=[common], help="Print the table of a results JSON (--model is the file).")
    sub.add_parser("preview", parents=[common], help="What the live preview adds to a step (zimage/bench/preview.py).")
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "build":
        from zimage.model.fullsize import build

        t = time.perf_counter()
        build(args.model, args.device)
        print(f"model at {args.model} ({time.perf_counter() - t:.1f}s)")
        return 0
    if args.cmd == "run":
        run(args)
        return 0
    if args.cmd == "table":
        results = json.loads(Path(args.model).read_text())
        print(table(results))
        print(app_table(results))
        return 0
    if args.cmd == "row":
        if args.kind == "toolbox":
            from zimage.bench.toolbox import row_toolbox

            emit(row_toolbox(args))
        else:
            from zimage.bench.rows import row_plain, row_zimage

            emit(row_plain(args) if args.kind == "plain" else row_zimage(args))
        return 0
    if args.cmd == "probe":
        from zimage.bench.explore import probe

        emit(probe(args))
        return 0
    if args.cmd == "imports":
        from zimage.bench.explore import imports

        emit(imports(args))
        return 0
    if args.cmd == "explore":
        from zimage.bench.explore import explore

        emit(explore(args))
        return 0
    if args.cmd == "preview":
        from zimage.bench.preview import bench_preview

        emit(bench_preview(args))
        return 0
    return 2
