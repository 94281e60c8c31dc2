"""`bench probe` (weight-read throughput) and `bench explore` (per-stage options in one process)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from zimage.bench.common import PROMPT, drop_caches, median, peak

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
            drop_caches(files)
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
        return median(xs)

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
        return median(r.timings.steps), r.timings.vae_decode, r.timings.text_encoder

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
    out.update(peak(torch))
    return out


# ------------------------------------------------------------------------------------------
# imports: where the app's import time goes (python -X importtime), and what each lever saves

APP_IMPORTS = """
import json, time
t0 = time.perf_counter()
import zimage.cli, zimage.settings, zimage.service.engine
t1 = time.perf_counter()
import torch
t2 = time.perf_counter()
from zimage.model.imports import import_libraries
import_libraries()
t3 = time.perf_counter()
import gradio, fastapi, uvicorn
import zimage.web.page, zimage.web.server
t4 = time.perf_counter()
print(json.dumps({"zimage": t1 - t0, "torch": t2 - t1, "diffusers+transformers": t3 - t2, "gradio+fastapi+page": t4 - t3}))
"""

VARIANTS = {
    "torch": "import torch",
    "torch, libtorch_cuda preloaded": (
        "import ctypes, os, importlib.util, pathlib, time; t=time.perf_counter(); "
        "p=pathlib.Path(next(iter(importlib.util.find_spec('torch').submodule_search_locations)))/'lib'/'libtorch_cuda.so'; "
        "p.is_file() and ctypes.CDLL(str(p), mode=os.RTLD_LOCAL|os.RTLD_NOW); "
        "print('preload', round(time.perf_counter()-t,3)); T0=time.perf_counter(); import torch"
    ),
    "libraries, package roots": (
        "import torch; T0=time.perf_counter(); import diffusers, transformers; "
        "from diffusers import ZImagePipeline, ZImageTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler; "
        "from transformers import AutoTokenizer, Qwen3Model"
    ),
    "libraries, own modules": (
        "import torch; T0=time.perf_counter(); from zimage.model.imports import import_libraries; import_libraries()"
    ),
}


def _timed(code: str) -> str:
    return (
        "import time; T0=time.perf_counter(); C0=time.process_time()\n"
        + code
        + "\nprint('wall', round(time.perf_counter()-T0,3), 'cpu', round(time.process_time()-C0,3))"
    )


def imports(args: argparse.Namespace) -> dict[str, Any]:
    """The app's import path under -X importtime (raw log to --out-dir), then each variant twice
    side by side in fresh processes."""
    import subprocess
    import sys
    from collections import Counter

    out: dict[str, Any] = {}
    out_dir = Path(args.workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", APP_IMPORTS], capture_output=True, text=True)
    (out_dir / "importtime-app.txt").write_text(proc.stderr)
    try:
        out["app_path_s"] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        out["app_path_error"] = proc.stderr[-2000:]
    by_package: Counter = Counter()
    cumulative = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[0].startswith("import time:") or "self" in parts[0]:
            continue
        self_us, cum_us, name = int(parts[0].split(":")[1]), int(parts[1]), parts[2]
        depth = (len(name) - len(name.lstrip())) // 2
        mod = name.strip()
        top = mod.split(".")[0]
        by_package[".".join(mod.split(".")[:2]) if top in ("torch", "diffusers", "transformers") else top] += self_us
        if depth <= 2:
            cumulative.append((cum_us, depth, mod))
    out["self_s_by_package"] = {k: round(v / 1e6, 3) for k, v in by_package.most_common(30)}
    out["top_cumulative"] = [[round(c / 1e6, 3), d, m] for c, d, m in sorted(cumulative, reverse=True)[:40]]
    print(json.dumps({"app_path_s": out.get("app_path_s"), "self_s_by_package": out["self_s_by_package"]}), flush=True)

    # variants in pairs, side by side (two fresh processes at a time)
    names = list(VARIANTS)
    results: dict[str, Any] = {}
    for pair in (names[:2], names[2:]):
        procs = {
            n: subprocess.Popen([sys.executable, "-c", _timed(VARIANTS[n])], stdout=subprocess.PIPE, text=True)
            for n in pair
        }
        for n, p in procs.items():
            results[n] = (p.communicate()[0] or "").strip().replace("\n", "; ")
    out["variants"] = results
    print(json.dumps(results), flush=True)
    return out
