"""`python -m zimage serve|generate|warmup|bench|doctor`.

Bad input exits with code 2 and one clear line; a model that cannot be found exits with 3;
a failure while generating exits with 1. Never a traceback for the user's mistakes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from zimage.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_MODEL, SettingsError
from zimage.settings import Settings, add_arguments, from_namespace


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own code too)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "python -m zimage") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,  # settings share prefixes with generate's flags (--lora, --lora-dir)
        description="zimage: a self-hosted studio for Z-Image-Turbo. Every setting can also come from "
        "the environment (ZIMAGE_<NAME>) or a YAML file (zimage.yaml).",
    )
    add_arguments(parser)  # settings may come before the command too; --help lists them all
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p_serve = sub.add_parser("serve", help="Start the web studio (same as python app.py).")
    add_arguments(p_serve)

    p_gen = sub.add_parser("generate", help="Generate images from the command line.")
    p_gen.add_argument("--prompt", required=True, help="What to draw.")
    p_gen.add_argument("--negative-prompt", default="", help="What to avoid (only used when guidance > 0).")
    p_gen.add_argument("--output", "-o", default="result.png", help="PNG file to write (default result.png).")
    p_gen.add_argument("--seed", default="-1", help="Seed; -1 picks a random one, which is printed.")
    p_gen.add_argument("--width", default=None, help="Width in pixels (multiple of 16).")
    p_gen.add_argument("--height", default=None, help="Height in pixels (multiple of 16).")
    p_gen.add_argument("--steps", default=None, help="Denoising steps (default 8).")
    p_gen.add_argument("--guidance", default="0", help="Guidance scale, 0-10 (default 0: no guidance).")
    p_gen.add_argument("--count", default="1", help="How many images (seeds s, s+1, ...).")
    p_gen.add_argument("--json", action="store_true", help="Print the result as JSON.")
    tools = p_gen.add_argument_group("image to image, inpainting and LoRAs")
    tools.add_argument("--image", default=None, help="Source picture: image to image (the size follows it).")
    tools.add_argument(
        "--strength", default=None, help="How much to change the source, above 0 up to 1 (default 0.6; 1 with --mask)."
    )
    tools.add_argument("--mask", default=None, help="Mask picture for inpainting: white = repaint, black = keep.")
    tools.add_argument("--feather", default="0", help="Blur of the mask's edge in pixels (default 0).")
    tools.add_argument(
        "--outpaint", default=None, help="Grow the canvas: pixels left,top,right,bottom (e.g. 0,0,256,0)."
    )
    tools.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="A LoRA (.safetensors path, or a name in lora_dir), weight 1 unless given; repeatable.",
    )
    add_arguments(p_gen)

    p_warm = sub.add_parser(
        "warmup",
        help="Build the compile artifacts ahead (e.g. in an image build), so starts load them instead of compiling.",
    )
    add_arguments(p_warm)

    p_bench = sub.add_parser("bench", help="Benchmark loading and generation (GPU machine).")
    p_bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="Arguments for the benchmark (see bench --help).")

    p_doc = sub.add_parser("doctor", help="Show the settings in effect, the hardware and the memory plan.")
    add_arguments(p_doc)
    return parser


def _settings(ns: argparse.Namespace) -> Settings:
    return from_namespace(ns)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    try:
        if ns.command == "bench":
            from zimage.bench.runner import main as bench_main

            return bench_main(ns.bench_args)
        settings = _settings(ns)
        if ns.command == "serve":
            from zimage.ops.operations import prepare_gradio_cache

            prepare_gradio_cache(settings.gradio_cache_dir)  # before Gradio is imported: it reads it then
    except SettingsError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(
        level=getattr(logging, settings.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        # serve: one line per request on stdout, for Supervisor's log; generate keeps stdout for its results
        stream=sys.stdout if ns.command == "serve" else sys.stderr,
    )
    if ns.command in ("serve", "generate", "warmup"):
        from zimage.model.early import start

        start(settings)  # side threads: library readahead, torch's CUDA library, the CUDA context
    if ns.command == "serve":
        from zimage.web.server import run

        return run(settings)
    if ns.command == "warmup":
        return _warmup(settings)
    if ns.command == "generate":
        return _generate(ns, settings)
    if ns.command == "doctor":
        return _doctor(settings)
    parser.print_help()
    return EXIT_BAD_INPUT


def _fail(exc: BaseException) -> int:
    """The one line a failed command prints, and the exit code for its kind."""
    from zimage.errors import InvalidRequest, ModelNotFound

    print(f"error: {exc}", file=sys.stderr)
    if isinstance(exc, ModelNotFound):
        return EXIT_NO_MODEL
    if isinstance(exc, InvalidRequest):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _generate(ns: argparse.Namespace, settings: Settings) -> int:
    from zimage.errors import InvalidRequest, ZImageError
    from zimage.service.engine import Engine
    from zimage.service.request import GenerationRequest, validate
    from zimage.service.store import write_png, write_problem

    # One run from the command line: a compile would cost more than it saves, unless asked for.
    if settings.compile == "auto":
        settings = settings.replace(compile="off")
    # Validate what the user typed before paying for the model.
    # one image, one pipeline: 'auto' would load a replica on every GPU for a single run
    replicas = "1" if settings.replicas == "auto" else settings.replicas
    try:
        picked = [_lora_arg(Path(settings.lora_dir).expanduser(), text) for text in ns.lora]
    except InvalidRequest as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    files = tuple(path for _name, _weight, path in picked if path)  # every replica's library gets them
    engine = Engine(settings.replace(warmup=False, replicas=replicas, lora_files=settings.lora_files + files))
    w, h = engine.default_size
    if ns.image is None and (ns.strength is not None or ns.mask is not None or ns.outpaint):
        print("error: --strength, --mask and --outpaint need a source picture: add --image IN.png.", file=sys.stderr)
        return EXIT_BAD_INPUT
    if ns.image is not None:  # the size follows the source unless given
        w = h = 0
    try:
        loras = tuple((name, weight) for name, weight, _path in picked)
        raw = GenerationRequest(
            prompt=ns.prompt,
            negative_prompt=ns.negative_prompt,
            width=ns.width if ns.width is not None else w,
            height=ns.height if ns.height is not None else h,
            steps=ns.steps if ns.steps is not None else settings.default_steps,
            guidance=ns.guidance,
            seed=ns.seed,
            count=ns.count,
            user="cli",
            image=ns.image,
            mask=ns.mask,
            strength=ns.strength,
            feather=ns.feather,
            outpaint=ns.outpaint or (0, 0, 0, 0),
            loras=loras,
        )
        request = validate(raw, engine.limits)
        engine.loras.check(request.loras)  # a bad LoRA file is refused before the model loads
    except InvalidRequest as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    output = Path(ns.output)
    if output.suffix.lower() != ".png":
        print(f"error: Output must be a .png file (got {str(output)!r}).", file=sys.stderr)
        return EXIT_BAD_INPUT
    if output.exists() and output.is_dir():
        print(f"error: Output {output} is a folder; give a file name such as {output / 'result.png'}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        engine.load()
        if engine.compiler is not None:  # --compile asked for: run on the compiled blocks
            engine.compiler.wait()
        result = engine.generate(request, save=False)
    except ZImageError as exc:
        return _fail(exc)
    import time

    paths = []
    t0 = time.perf_counter()
    for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
        path = output if len(result.images) == 1 else output.with_name(f"{output.stem}-{i + 1}{output.suffix}")
        meta = result.metadata(seed) if settings.png_metadata else None
        try:
            write_png(image, path, meta, settings.png_compress_level)
        except OSError as exc:
            print(f"error: Could not write {path}: {write_problem(exc)}.", file=sys.stderr)
            return EXIT_FAILED
        paths.append(path)
    result.timings.png = time.perf_counter() - t0
    result.paths = [str(p) for p in paths]
    t = result.timings
    if ns.json:
        import json

        print(
            json.dumps(
                {
                    **result.details(),
                    "paths": result.paths,
                    "size": [request.width, request.height],
                    "load": engine.timeline.snapshot(),
                }
            )
        )
    else:
        for note in result.notes:
            print(f"note: {note}")
        for path, seed in zip(paths, result.seeds):
            print(f"wrote {path} (seed {seed}, {request.width}x{request.height})")
        print(f"model {result.model} on {result.device}, memory mode {result.memory_mode}")
        print(
            f"stages: text encoder {t.text_encoder:.3f}s | {len(t.steps)} steps {t.denoise:.3f}s "
            f"({t.it_per_s:.2f} it/s) | VAE decode {t.vae_decode:.3f}s | to host {t.to_host:.3f}s | "
            f"PNG {t.png:.3f}s"
        )
        print(
            f"image ready {t.gpu_total:.3f}s after the request; model ready {engine.timeline.ready_at:.1f}s after start"
        )
    return 0


def _warmup(settings: Settings) -> int:
    """Load, compile, save the compile artifacts and the import manifest; say what was written."""
    from zimage.errors import ZImageError
    from zimage.model.early import manifest_path
    from zimage.service.engine import Engine

    engine = Engine(settings.replace(warmup=True))
    try:
        engine.load()
    except ZImageError as exc:
        return _fail(exc)
    compiler = engine.compiler
    print(f"model {engine.source.name} on {engine.model.device_name}, memory mode {engine.plan.mode}")
    if compiler is None:
        print(
            f"compile is off here (compile={settings.compile}, mode {engine.plan.mode}): no compile artifacts to build"
        )
    else:
        compiler.wait()
        snap = compiler.snapshot()
        if compiler.state != "live":
            print(f"error: the compile failed: {compiler.error}", file=sys.stderr)
            return EXIT_FAILED
        if compiler.saved:
            print(f"wrote {compiler.saved} (compiled in {snap['seconds']:.1f}s)")
        elif snap["artifacts"] == "loaded":
            print(f"up to date: the compile artifacts were already there ({compiler.artifacts.detail})")
        else:
            print("compiled, but the compile backend made no artifacts to save")
    engine.shutdown(5)
    print(f"wrote {manifest_path(settings.compile_cache_dir)} (files the next start reads ahead)")
    return 0


def _lora_arg(folder: Path, text: str) -> tuple[str, float, str | None]:
    """FILE[:WEIGHT] -> (name, weight, the file's path when it lies outside lora_dir, else None)."""
    from zimage.errors import BadLora, InvalidRequest

    name, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            name, weight = head, float(tail)
        except ValueError:
            raise InvalidRequest("--lora", text, "FILE or FILE:WEIGHT with a number as the weight") from None
    in_folder = Path(name).name == name and (folder / name).is_file()
    if not in_folder and ("/" in name or "\\" in name or Path(name).is_file()):
        path = Path(name).expanduser()
        if not path.is_file():
            raise BadLora(name, "the file does not exist.")
        return path.name, weight, str(path.resolve())
    return name, weight, None


def _doctor(settings: Settings) -> int:
    from zimage.errors import ModelNotFound, ZImageError
    from zimage.model.loading import footprint, resolve_model
    from zimage.model.memory import probe_hardware
    from zimage.model.pipeline import pick_device, plan_memory
    from zimage.settings import describe

    print("settings in effect:")
    for name, value, _help in describe(settings):
        print(f"  {name} = {value!r}")
    hw = probe_hardware()
    print(f"hardware: {hw.describe()}")
    try:
        source = resolve_model(settings)
    except ModelNotFound as exc:
        print(f"model: not found: {exc}")
        return EXIT_NO_MODEL
    fp = footprint(source, settings.trim_text_encoder)
    print(
        f"model: {source.name} at {source.path} (transformer {fp.transformer / 2**30:.2f} GiB, "
        f"text encoder {fp.text_encoder / 2**30:.2f} GiB, VAE {fp.vae / 2**30:.3f} GiB)"
    )
    import torch

    try:
        device, _dtype = pick_device(settings, torch)
    except ZImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # the engine's own plan: same device, memory fraction and per-GPU caps
    plan = plan_memory(settings, fp, device, hw if device.startswith("cuda") else None)
    print(f"memory mode: {plan.describe()}")
    return 0
