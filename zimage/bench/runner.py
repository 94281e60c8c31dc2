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
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = (
    "A weathered lighthouse on a rocky cliff at dusk, waves crashing below, warm light in the "
    "windows, seagulls, dramatic clouds"
)
MARK = "BENCH_ROW "

# name -> how to run it. page: cold (page cache dropped) or warm; cache: empty / keep (compile cache)
ROWS: dict[str, dict[str, Any]] = {
    "plain-cold": {"kind": "plain", "page": "cold"},
    "plain-warm": {"kind": "plain", "page": "warm"},
    "plain-compiled": {"kind": "plain", "variant": "compiled", "page": "warm"},
    "plain-model-offload": {"kind": "plain", "variant": "model-offload", "page": "warm", "runs": 2},
    "plain-group-offload": {"kind": "plain", "variant": "group-offload", "page": "warm", "runs": 3},
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


def _now() -> float:
    return time.time()


def _origin() -> float:
    from zimage.ops.profiler import process_start_time

    return process_start_time()


def _emit(row: dict[str, Any]) -> None:
    print(MARK + json.dumps(row), flush=True)


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def _peak(torch) -> dict[str, float]:
    if not torch.cuda.is_available():
        import psutil

        return {"peak_host_rss_gib": _gib(psutil.Process().memory_info().rss)}
    return {
        "peak_allocated_gib": _gib(torch.cuda.max_memory_allocated()),
        "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved()),
    }


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


# ------------------------------------------------------------------------------------------
# row: plain diffusers, as the model card writes it


def row_plain(args: argparse.Namespace) -> dict[str, Any]:
    origin = _origin()
    t_import = time.perf_counter()
    import torch
    from diffusers import ZImagePipeline

    import_s = time.perf_counter() - t_import
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.cap_gib and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"torch_dtype": torch.bfloat16 if cuda else torch.float32}
    if args.variant == "compiled" and cuda:
        kwargs["device_map"] = "cuda"
    pipe = ZImagePipeline.from_pretrained(args.model, **kwargs)
    from_pretrained_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if args.variant == "model-offload":
        pipe.enable_model_cpu_offload()
    elif args.variant == "group-offload":
        from diffusers.hooks import apply_group_offloading

        for module in (pipe.transformer, pipe.text_encoder):
            apply_group_offloading(
                module, onload_device=torch.device(device), offload_type="leaf_level", use_stream=cuda
            )
        pipe.vae.to(device)
    elif args.variant != "compiled":
        pipe.to(device)
    if args.variant == "compiled":
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    place_s = time.perf_counter() - t1
    pipe.set_progress_bar_config(disable=True)
    ready = _now() - origin

    def gen(steps: int):
        g = torch.Generator(device).manual_seed(42)
        t = time.perf_counter()
        image = pipe(
            PROMPT,
            height=args.size,
            width=args.size,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=g,
        ).images[0]
        return time.perf_counter() - t, image

    first_s, _ = gen(args.steps)
    first_at = _now() - origin
    warm = [gen(args.steps)[0] for _ in range(args.runs)]
    out: dict[str, Any] = {
        "import_s": round(import_s, 3),
        "from_pretrained_s": round(from_pretrained_s, 3),
        "place_s": round(place_s, 3),
        "start_to_ready_s": round(ready, 3),
        "first_image_s": round(first_s, 4),
        "start_to_first_image_s": round(first_at, 3),
        "warm_s": [round(x, 4) for x in warm],
        "warm_median_s": _median(warm),
    }
    if args.steps != 9 and args.also_nine and args.variant in (None, "", "compiled"):
        nine = [gen(9)[0] for _ in range(3)]
        out["warm_median_9_steps_s"] = _median(nine)
    out["split"] = _plain_split(torch, pipe, gen, args.steps)
    out.update(_peak(torch))
    return out


def _plain_split(torch, pipe, gen, steps: int) -> dict[str, float]:
    """Stage times of one extra plain run, from synchronised hooks (after the timed runs)."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks: dict[str, list[float]] = {"text_encoder": [], "transformer": [], "vae": []}
    starts: dict[str, float] = {}

    def pre(name):
        def hook(*_a, **_k):
            sync()
            starts[name] = time.perf_counter()

        return hook

    def post(name):
        def hook(*_a, **_k):
            sync()
            marks[name].append(time.perf_counter() - starts[name])

        return hook

    handles = []
    for name, mod in (("text_encoder", pipe.text_encoder), ("transformer", pipe.transformer)):
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post(name)))
    original = pipe.vae.decode

    def decode(*a, **k):
        pre("vae")()
        out = original(*a, **k)
        post("vae")()
        return out

    pipe.vae.decode = decode
    try:
        total, _ = gen(steps)
    finally:
        pipe.vae.decode = original
        for h in handles:
            h.remove()
    return {
        "text_encoder_s": round(sum(marks["text_encoder"]), 4),
        "denoise_s": round(sum(marks["transformer"]), 4),
        "vae_decode_s": round(sum(marks["vae"]), 4),
        "total_s": round(total, 4),
    }


# ------------------------------------------------------------------------------------------
# row: zimage


def row_zimage(args: argparse.Namespace) -> dict[str, Any]:
    origin = _origin()
    from zimage.service.engine import Engine
    from zimage.service.request import GenerationRequest
    from zimage.settings import Settings

    extra = json.loads(args.settings or "{}")
    out_dir = Path(args.workdir) / "outputs"
    settings = Settings(
        model=args.model,
        outputs_dir=str(out_dir),
        compile_cache_dir=args.compile_cache,
        min_size=min(256, args.size),
        **extra,
    )
    if args.cap_gib:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            settings = settings.replace(memory_fraction=min(1.0, args.cap_gib * 2**30 / total))
    engine = Engine(settings)
    engine.load()
    import torch

    ready = engine.timeline.ready_at
    req = GenerationRequest(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=42)

    def gen(save: bool = False):
        t = time.perf_counter()
        result = engine.generate(req, save=save)
        return time.perf_counter() - t, result

    first_s, _ = gen()
    first_at = _now() - origin
    warm = [gen() for _ in range(args.runs)]
    warm_s = [w for w, _ in warm]
    timings = [r.timings for _, r in warm]

    # PNG writing beside the next job: back-to-back jobs with saving on.
    saved = []
    for _ in range(args.runs):
        t = time.perf_counter()
        result = engine.generate(req, save=True)
        decoded = time.perf_counter() - t
        saved.append((t, decoded, result))
    png_done = []
    for _t, _decoded, result in saved:
        result.wait_saved(120)
        png_done.append(result)
    # request -> PNG on disk, one job alone (nothing queued behind it)
    t = time.perf_counter()
    alone = engine.generate(req, save=True)
    alone.wait_saved(120)
    request_to_png_alone = time.perf_counter() - t

    out: dict[str, Any] = {
        "start_to_ready_s": round(ready, 3) if ready else None,
        "first_image_s": round(first_s, 4),
        "start_to_first_image_s": round(first_at, 3),
        "warm_s": [round(x, 4) for x in warm_s],
        "warm_median_s": _median(warm_s),
        "split": {
            "text_encoder_s": _median([t.text_encoder for t in timings]),
            "denoise_s": _median([t.denoise for t in timings]),
            "step_s": _median([s for t in timings for s in t.steps]),
            "vae_decode_s": _median([t.vae_decode for t in timings]),
            "to_host_s": _median([t.to_host for t in timings]),
            "engine_total_s": _median([t.gpu_total for t in timings]),
        },
        "with_saving": {
            "decoded_s": [round(d, 4) for _, d, _ in saved],
            "decoded_median_s": _median([d for _, d, _ in saved]),
            "png_encode_write_s": _median([r.timings.png for r in png_done if r.timings.png]),
            "request_to_png_alone_s": round(request_to_png_alone, 4),
        },
        "memory_mode": engine.plan.mode if engine.plan else None,
        "memory_reason": engine.plan.reason if engine.plan else None,
        "notes": engine.notes,
        "load_timeline": engine.timeline.snapshot()["stages"],
    }
    out.update(_peak(torch))
    engine.shutdown(5)
    return out


# ------------------------------------------------------------------------------------------
# probe: weight-read throughput and import times


def probe(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from zimage.model.weights import WeightReader, index_folder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(args.model)
    entries = [e for comp in ("transformer", "text_encoder", "vae") for e in index_folder(folder / comp).values()]
    files = sorted({e.file for e in entries})
    total = sum(e.nbytes for e in entries)
    out: dict[str, Any] = {"bytes": total, "reads": []}
    configs = [
        ("warm", 8, 64, True),
        ("warm", 16, 64, True),
        ("warm", 4, 64, True),
        ("warm", 8, 16, True),
        ("warm", 8, 64, False),
        ("cold", 8, 64, True),
        ("cold", 16, 32, True),
    ]
    for page, threads, mb, pinned in configs:
        if page == "cold":
            _drop_caches(files)
        else:
            for f in files:  # make sure it is cached
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
        reader = WeightReader(device, threads, mb << 20, pinned, pinned)
        t = time.perf_counter()
        tensors = reader.read(entries)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        del tensors
        if device == "cuda":
            torch.cuda.empty_cache()
        out["reads"].append(
            {
                "page": page,
                "threads": threads,
                "staging_mb": mb,
                "pinned": pinned,
                "s": round(dt, 3),
                "gib_per_s": round(total / 2**30 / dt, 3),
            }
        )
        print(json.dumps(out["reads"][-1]), flush=True)
    return out


def _drop_caches(files: list[Path]) -> str:
    """Drop the page cache: the whole of it when we may (root), else these files' pages."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        from zimage.model.weights import drop_page_cache

        drop_page_cache(files)
        return "fadvise"


# ------------------------------------------------------------------------------------------
# explore: options per stage, measured in one process


def explore(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from zimage.service.engine import Engine
    from zimage.service.request import GenerationRequest
    from zimage.settings import Settings

    settings = Settings(
        model=args.model,
        compile="off",
        warmup=False,
        outputs_dir=str(Path(args.workdir) / "outputs"),
        compile_cache_dir=args.compile_cache,
    )
    engine = Engine(settings)
    engine.load()
    pipe = engine.pipe
    out: dict[str, Any] = {"load_timeline": engine.timeline.snapshot()["stages"]}
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timeit(fn, n=10, warm=2):
        for _ in range(warm):
            fn()
        sync()
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            sync()
            xs.append(time.perf_counter() - t)
        return _median(xs)

    with torch.no_grad():
        out["text_encoder_real_s"] = timeit(lambda: engine.runner.encode(PROMPT, real_length=True))
        out["text_encoder_padded512_s"] = timeit(lambda: engine.runner.encode(PROMPT, real_length=False))
        tok = pipe.tokenizer
        text = tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        out["prompt_tokens"] = len(tok(text).input_ids)

    def steps_time(n_steps=4):
        req = GenerationRequest(PROMPT, width=args.size, height=args.size, steps=n_steps, seed=1)
        engine.generate(req, save=False)
        r = engine.generate(req, save=False)
        return _median(r.timings.steps), r.timings.vae_decode, r.timings.text_encoder

    backends = ["native", "_native_cudnn", "_native_flash", "_flash_3"]
    out["eager_step_s"] = {}
    for b in backends:
        try:
            pipe.transformer.set_attention_backend(b)
            out["eager_step_s"][b] = steps_time()[0]
        except Exception as exc:  # noqa: BLE001 - a missing backend is a result
            out["eager_step_s"][b] = f"unavailable: {str(exc)[:120]}"
        print(json.dumps({"backend": b, "step": out["eager_step_s"][b]}), flush=True)
    pipe.transformer.set_attention_backend("native")
    out["eager_vae_s"] = steps_time(1)[1]

    def uncompile():
        for m in pipe.transformer.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None
        torch._dynamo.reset()

    out["compiled"] = {}
    for name, kw in (("dynamic", {"dynamic": True}),):
        uncompile()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, **kw)
        t = time.perf_counter()
        steps_time(2)
        compile_s = time.perf_counter() - t
        step = steps_time(4)[0]
        # a second caption length: does it recompile, and what does the step cost then?
        t = time.perf_counter()
        engine.generate(
            GenerationRequest(
                PROMPT + " with a red boat and a tall pine tree", width=args.size, height=args.size, steps=2, seed=1
            ),
            save=False,
        )
        second_len_s = time.perf_counter() - t
        step_after = steps_time(4)[0]
        out["compiled"][name] = {
            "first_call_s": round(compile_s, 2),
            "step_s": step,
            "new_caption_length_call_s": round(second_len_s, 2),
            "step_after_s": step_after,
        }
        print(json.dumps({name: out["compiled"][name]}), flush=True)
    if cuda:
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.vae.decoder.compile(dynamic=True)
        steps_time(1)
        out["compiled_vae_s"] = steps_time(1)[1]
        from zimage.model.speed import compile_text_encoder

        compile_text_encoder(pipe.text_encoder)
        with torch.no_grad():
            t = time.perf_counter()
            engine.runner.encode(PROMPT)
            engine.runner.encode(PROMPT + " and a second, longer sentence about boats and a tall pine tree")
            out["text_encoder_compile_s"] = round(time.perf_counter() - t, 2)
            out["text_encoder_compiled_real_s"] = timeit(lambda: engine.runner.encode(PROMPT))
        print(json.dumps({k: out.get(k) for k in ("compiled_vae_s", "text_encoder_compiled_real_s")}), flush=True)
    out.update(_peak(torch))
    return out


# ------------------------------------------------------------------------------------------
# orchestration


def _versions() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            info["gpu_total_gib"] = _gib(torch.cuda.get_device_properties(0).total_memory)
        else:
            info["device"] = "cpu"
    except Exception:  # noqa: BLE001
        info["device"] = None
    info["cpus"] = os.cpu_count()
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = Path(args.model)
    files = sorted(model.rglob("*.safetensors"))
    workdir = Path(args.workdir)
    cache = workdir / "inductor"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"env": _versions(), "size": args.size, "steps": args.steps, "prompt": PROMPT, "rows": {}}
    for name in [r for r in args.rows.split(",") if r]:
        spec = ROWS[name]
        if spec.get("cache") == "empty" and cache.exists():
            shutil.rmtree(cache)
        method = _drop_caches(files) if spec["page"] == "cold" else "warm"
        if spec["page"] == "warm":
            for f in files:
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
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
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
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
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    return results


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
    w = sub.add_parser("row", parents=[common], help="One row in this process (used by run).")
    w.add_argument("--kind", choices=("plain", "zimage", "toolbox"), required=True)
    w.add_argument("--variant", default="")
    w.add_argument("--settings", default="")
    w.add_argument("--cap-gib", type=float, default=0)
    w.add_argument("--also-nine", action="store_true")
    sub.add_parser("probe", parents=[common], help="Weight-read throughput.")
    sub.add_parser("explore", parents=[common], help="Stage options in one process.")
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
        print(table(json.loads(Path(args.model).read_text())))
        return 0
    if args.cmd == "row":
        if args.kind == "toolbox":
            from zimage.bench.toolbox import row_toolbox

            _emit(row_toolbox(args))
        else:
            _emit(row_plain(args) if args.kind == "plain" else row_zimage(args))
        return 0
    if args.cmd == "probe":
        _emit(probe(args))
        return 0
    if args.cmd == "explore":
        _emit(explore(args))
        return 0
    if args.cmd == "preview":
        from zimage.bench.preview import bench_preview

        _emit(bench_preview(args))
        return 0
    return 2
