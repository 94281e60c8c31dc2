"""The studio page: a Gradio 6 Blocks UI built around one injected Engine.

`build_ui(engine, ops, settings)` returns the Blocks; server.py mounts it on FastAPI with the
options from `page_options()`. Nothing here touches the GPU directly: every image goes through
`engine.generate`, which holds the one GPU lock. The page adds a second guard in front of it:
every GPU listener shares one `concurrency_id` with a limit of 1, so Gradio's own queue (and
its queue position display) is where people wait.
"""

from __future__ import annotations

import html
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import gradio as gr

from .presets import ASPECT_RATIOS, RESOLUTION_TIERS, size_for
from .requests import GUIDANCE_MAX, SEED_MAX, GenerationRequest, ZImageError
from .store import read_parameters

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GPU_QUEUE = "gpu"  # the one concurrency group of every listener that runs the pipeline
CUSTOM = "Custom"
HISTORY_LIMIT = 40
# Gradio copies every returned image into its cache; these copies are only needed while a page
# shows them (history is served from the outputs folder), so sweep hourly, keep six hours.
CACHE_SWEEP = (3600, 6 * 3600)
PROGRESS_EVERY_S = 0.1  # at most ten progress updates a second to each browser
INTERNAL_ERROR = "Something went wrong inside the server (it is logged). The server is fine: please try again."

API_DESCRIPTION = (
    "Generate images with Z-Image-Turbo. Arguments: prompt, negative_prompt (used only when "
    "guidance > 0), width and height (multiples of 16 within the server's limits), steps, "
    "guidance (0 = off, the Turbo default), seed (-1 = random), count (images; seeds s, s+1, ...). "
    "Returns the gallery (the saved PNG files, parameters embedded) and a details dict with the "
    "seeds actually used, stage timings, memory mode and device."
)


# ------------------------------------------------------------------------------------------
# assets and page options


def load_examples(path: Path | None = None) -> list[dict[str, str]]:
    """Example prompts ({lang, prompt}) from assets/examples.json; [] when the file is missing."""
    path = path or ASSETS / "examples.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("no example prompts: cannot read %s", path)
        return []
    items = data.get("examples", []) if isinstance(data, dict) else data
    return [e for e in items if isinstance(e, dict) and isinstance(e.get("prompt"), str)]


def _logo_svg() -> str:
    try:
        return (ASSETS / "logo.svg").read_text(encoding="utf-8")
    except OSError:
        return ""


def theme() -> gr.themes.Base:
    return gr.themes.Soft(
        primary_hue=gr.themes.colors.indigo,
        secondary_hue=gr.themes.colors.teal,
        neutral_hue=gr.themes.colors.slate,
        # local fonts only: the studio must look right on machines without internet access
        font=["Inter", "ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Noto Sans", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
    ).set(
        body_background_fill="*neutral_50",
        block_radius="14px",
        button_large_radius="12px",
    )


def page_options() -> dict[str, Any]:
    """Keyword arguments for gr.mount_gradio_app: theme, css, favicon."""
    css = ASSETS / "studio.css"
    logo = ASSETS / "logo.svg"
    return {
        "theme": theme(),
        "css_paths": [css] if css.is_file() else [],
        "favicon_path": str(logo) if logo.is_file() else None,
    }


# ------------------------------------------------------------------------------------------
# sizes


def size_tiers(default_size: int, max_size: int) -> tuple[int, ...]:
    """Resolution tiers offered: the preset's default (small for the tiny model) and the usual tiers."""
    tiers = {t for t in RESOLUTION_TIERS if t <= max_size}
    if default_size < min(RESOLUTION_TIERS):
        tiers |= {default_size, default_size * 2} if default_size * 2 < min(RESOLUTION_TIERS) else {default_size}
    tiers.add(default_size)
    return tuple(sorted(t for t in tiers if t <= max_size))


def ratio_label(ratio: tuple[int, int]) -> str:
    return f"{ratio[0]}:{ratio[1]}"


def preset_size(label: str, tier: int, min_size: int, max_size: int) -> tuple[int, int, str]:
    """(width, height, note): the ratio at about tier x tier pixels, scaled to fit the limits."""
    rw, rh = (int(x) for x in label.split(":"))
    w, h = size_for((rw, rh), int(tier))
    note = ""
    if max(w, h) > max_size or min(w, h) < min_size:
        scale = max_size / max(w, h) if max(w, h) > max_size else min_size / min(w, h)
        w, h = (max(min_size, min(max_size, int(round(v * scale / 16)) * 16)) for v in (w, h))
        note = f"scaled to fit the {min_size}-{max_size} px limits"
    return w, h, note


def match_preset(width: int, height: int, tiers: tuple[int, ...], min_size: int, max_size: int):
    """The (ratio label, tier) that gives exactly this size, or (CUSTOM, None)."""
    for tier in tiers:
        for ratio in ASPECT_RATIOS:
            w, h, _ = preset_size(ratio_label(ratio), tier, min_size, max_size)
            if (w, h) == (width, height):
                return ratio_label(ratio), tier
    return CUSTOM, None


def size_note(width: Any, height: Any, extra: str = "") -> str:
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError):
        return ""
    text = f"{w} × {h} px · {w * h / 1e6:.2f} MP"
    return f"{text} · {extra}" if extra else text


# ------------------------------------------------------------------------------------------
# formatting for the profiler panel and the banner (pure: tested without a server)


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s}s" if m else f"{s}s"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bar_rows(rows: list[tuple[str, float | None, str]], scale: float) -> str:
    out = []
    for name, seconds, extra in rows:
        width = 0 if not seconds or scale <= 0 else max(1.5, min(100.0, 100.0 * seconds / scale))
        out.append(
            f'<div class="zi-row"><span class="zi-k">{_e(name)}</span>'
            f'<span class="zi-bar"><i style="width:{width:.1f}%"></i></span>'
            f'<span class="zi-v">{_e(_s(seconds))}</span>'
            + (f'<span class="zi-x">{_e(extra)}</span>' if extra else "")
            + "</div>"
        )
    return "".join(out)


def _timings_dict(timings: Any) -> dict[str, Any]:
    if timings is None:
        return {}
    if isinstance(timings, dict):
        return timings
    return timings.as_dict()


def render_profiler(status: dict[str, Any], ops_status: dict[str, Any] | None = None, waiting: int = 0) -> str:
    """The live profiler panel as HTML, from engine.status() and ops.status()."""
    sections = [
        _last_run_card(status.get("last")),
        _effect_card(status),
        _memory_card(status.get("memory") or {}),
        _queue_card(status, waiting),
        _load_card(status.get("load") or {}),
    ]
    if ops_status:
        sections.append(_ops_card(ops_status))
    return '<div class="zi-prof">' + "".join(sections) + "</div>"


def _card(cls: str, title: str, body: str) -> str:
    return f'<section class="zi-card {cls}"><h4>{_e(title)}</h4>{body}</section>'


def _kv(key: str, value: Any, cls: str = "") -> str:
    return f'<div class="zi-kv {cls}"><span>{_e(key)}</span><b>{_e(value)}</b></div>'


def _last_run_card(last: dict[str, Any] | None) -> str:
    if not last:
        return _card("zi-last", "Last run", '<p class="zi-muted">No image yet: each stage\'s time shows here.</p>')
    t = _timings_dict(last.get("timings"))
    steps = t.get("steps_s") or []
    total = t.get("total_s") or 0.0
    png = t.get("png_s")
    rows = [
        ("Text encoder", t.get("text_encoder_s"), ""),
        ("Denoise", t.get("denoise_s"), f"{len(steps)} steps · {t.get('it_per_s', 0):.2f} it/s"),
        ("VAE decode", t.get("vae_decode_s"), ""),
        ("To host", t.get("to_host_s"), ""),
        ("PNG save", png, "" if png is not None else "writing…"),
    ]
    when = last.get("when")
    ago = f" · {_uptime(time.time() - when)} ago" if when else ""
    seeds = last.get("seeds") or []
    seed_text = (f"seed {seeds[0]}" + (f"…{seeds[-1]}" if len(seeds) > 1 else "")) if seeds else ""
    body = (
        f'<div class="zi-headline"><b>{_e(_s(total))}</b><span>{t.get("it_per_s", 0):.2f} it/s</span></div>'
        + _bar_rows(rows, max(total, png or 0.0))
        + f'<div class="zi-total"><span>queue wait {_e(_s(t.get("queue_wait_s")))}</span>'
        f"<span>{_e(last.get('size', ''))} × {_e(last.get('count', 1))}</span></div>"
        f'<p class="zi-muted">{_e(last.get("steps", ""))} steps · {_e(seed_text)}{_e(ago)}</p>'
    )
    if last.get("notes"):
        body += '<ul class="zi-notes">' + "".join(f"<li>{_e(n)}</li>" for n in last["notes"]) + "</ul>"
    return _card("zi-last", "Last run", body)


def _effect_card(status: dict[str, Any]) -> str:
    mode = status.get("memory_mode")
    if not mode:
        return _card("zi-effect", "In effect", '<p class="zi-muted">Decided once the model has loaded.</p>')
    device = status.get("device_name") or status.get("device") or "?"
    chips = [f'<span class="zi-chip zi-chip-mode">mode {_e(mode)}</span>', f'<span class="zi-chip">{_e(device)}</span>']
    if status.get("dtype"):
        chips.append(f'<span class="zi-chip">{_e(status["dtype"])}</span>')
    body = f'<div class="zi-chips">{"".join(chips)}</div>'
    if status.get("memory_reason"):
        body += f'<p class="zi-reason">{_e(status["memory_reason"])}</p>'
    notes = status.get("notes") or []
    if notes:
        body += '<ul class="zi-notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    return _card("zi-effect", f"In effect · {status.get('model', '')}", body)


def _memory_card(mem: dict[str, Any]) -> str:
    rows = []
    for g in mem.get("gpus") or []:
        i = g.get("index")
        rows.append(_kv(f"VRAM {i} in use", _bytes(g.get("allocated_bytes"))))
        rows.append(_kv(f"VRAM {i} peak", _bytes(g.get("peak_allocated_bytes"))))
        rows.append(
            _kv(
                "reserved now / peak",
                f"{_bytes(g.get('reserved_bytes'))} / {_bytes(g.get('peak_reserved_bytes'))}",
                "zi-sub",
            )
        )
    if not mem.get("gpus"):
        rows.append(_kv("VRAM", "no GPU in use"))
    rows.append(_kv("Process memory", _bytes(mem.get("host_rss_bytes"))))
    return _card("zi-mem", "Memory", "".join(rows))


def _queue_card(status: dict[str, Any], waiting: int) -> str:
    running = status.get("running_step")
    rows = [
        _kv("Waiting", int(status.get("queue_depth") or 0) + int(waiting or 0)),
        _kv("Running", f"step {running[0]}/{running[1]}" if running else "idle"),
        _kv("Images made", status.get("images_made", 0)),
        _kv("Uptime", _uptime(status.get("uptime_s", 0))),
    ]
    if status.get("pending_writes"):
        rows.append(_kv("PNG writes pending", status["pending_writes"]))
    return _card("zi-queue", "Queue", "".join(rows))


def _load_card(load: dict[str, Any]) -> str:
    stages = load.get("stages") or []
    rows = []
    if stages:
        end = max((s["start_s"] + (s["duration_s"] or 0.0)) for s in stages) or 1.0
        for st in stages:
            dur = st.get("duration_s")
            shown = _s(dur) if dur is not None else ("failed" if load.get("error") else "…")
            rows.append(
                f'<div class="zi-row" title="{_e(st.get("detail", ""))}"><span class="zi-k">{_e(st["name"])}</span>'
                f'<span class="zi-bar zi-gantt"><i style="margin-left:{100 * st["start_s"] / end:.1f}%;'
                f'width:{max(1.0, 100 * (dur or 0) / end):.1f}%"></i></span>'
                f'<span class="zi-v">{_e(shown)}</span></div>'
            )
    if load.get("error"):
        rows.append(f'<p class="zi-error">Failed: {_e(load["error"])}</p>')
    elif load.get("ready_at_s") is not None:
        rows.append(f'<p class="zi-muted">Ready {_e(_s(load["ready_at_s"]))} after the process started.</p>')
    else:
        rows.append(
            f'<p class="zi-muted">Loading: {_e(load.get("current", "waiting"))} '
            f"{_e(load.get('percent', 0))}% · {_e(_s(load.get('elapsed_s')))}</p>"
        )
    return _card("zi-load", "Model load", "".join(rows))


def _ops_card(ops_status: dict[str, Any]) -> str:
    rows = []
    for key, value in ops_status.items():
        shown = value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, default=str)
        rows.append(_kv(str(key).replace("_", " "), shown))
    return _card("zi-ops", "Operations", "".join(rows))


def render_banner(status: dict[str, Any]) -> str:
    """The status pill at the top: loading progress, the load error, or what is serving."""
    load = status.get("load") or {}
    if load.get("error"):
        return (
            '<div class="zi-banner zi-banner-error"><b>The model failed to load.</b> '
            f"{_e(load['error'])}<br><span>/ready reports the same; fix the cause and restart.</span></div>"
        )
    if not status.get("ready"):
        pct = float(load.get("percent") or 0.0)
        return (
            '<div class="zi-banner zi-banner-loading">'
            f'<span class="zi-dot"></span><b>Loading the model</b> · {_e(load.get("current", "waiting"))} '
            f"{pct:.0f}% · {_e(_s(load.get('elapsed_s')))}"
            f'<span class="zi-progress"><i style="width:{max(3.0, pct):.0f}%"></i></span>'
            "<span>Requests wait in the queue until it is ready.</span></div>"
        )
    device = status.get("device_name") or status.get("device")
    return (
        '<div class="zi-banner zi-banner-ready"><span class="zi-dot"></span><b>Ready</b> · '
        f"{_e(status.get('model', ''))} on {_e(device)} · mode {_e(status.get('memory_mode'))}</div>"
    )


def summary_markdown(details: dict[str, Any]) -> str:
    """One honest line about a finished run: the seed used, the size, the time of each stage."""
    if not details:
        return ""
    t = details.get("timings") or {}
    seeds = details.get("seeds") or []
    seed_text = ", ".join(str(s) for s in seeds[:8]) + (" …" if len(seeds) > 8 else "")
    png = t.get("png_s")
    lines = [
        f"**Seed {seed_text}** · {details.get('width')}×{details.get('height')} · "
        f"{details.get('steps')} steps · guidance {details.get('guidance')}",
        f"Total **{_s(t.get('total_s'))}** — text encoder {_s(t.get('text_encoder_s'))} · "
        f"denoise {_s(t.get('denoise_s'))} ({t.get('it_per_s', 0):.2f} it/s) · VAE decode "
        f"{_s(t.get('vae_decode_s'))} · PNG {_s(png)} · mode `{details.get('memory_mode')}` on "
        f"{details.get('device')}",
    ]
    for note in details.get("notes") or []:
        lines.append(f"⚠️ {note}")
    return "  \n".join(lines)


def parameters_markdown(params: dict[str, Any], name: str = "") -> str:
    """A selected or dropped image's parameters, in three short lines."""
    if not params:
        return f"**{name}** carries no zimage parameters." if name else ""
    facts = [
        f"seed `{params.get('seed')}`",
        f"`{params.get('width')}×{params.get('height')}`",
        f"{params.get('steps')} steps",
        f"guidance {params.get('guidance')}",
    ]
    for key, label in (("model", "model"), ("memory_mode", "mode"), ("device", "on")):
        if params.get(key):
            facts.append(f"{label} {params[key]}")
    total = (params.get("timings") or {}).get("total_s")
    if total is not None:
        facts.append(_s(total))
    lines = [f"**{name}** · {params.get('prompt', '')}" if name else str(params.get("prompt", ""))]
    lines.append(" · ".join(facts))
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    return "  \n".join(lines)


_SEED_IN_NAME = re.compile(r"-seed(\d+)")


def history_items(paths: list[Path]) -> list[tuple[str, str]]:
    items = []
    for p in paths:
        m = _SEED_IN_NAME.search(p.name)
        items.append((str(p), f"seed {m.group(1)}" if m else p.stem))
    return items


# ------------------------------------------------------------------------------------------
# the handlers


def _who(request) -> str:
    """The logged-in user, else the client's address: the request log always says who asked."""
    user = getattr(request, "username", None)
    if user:
        return str(user)
    client = getattr(request, "client", None)
    return str(getattr(client, "host", "") or "") if client else ""


class _Progress:
    """Feeds gr.Progress from the engine's progress(phase, done, total) callback, with an ETA.

    The first call comes from inside the GPU lock, right after the run started: its time is
    when this job began using the pipeline."""

    def __init__(self, progress: gr.Progress):
        self.progress = progress
        self.started: float | None = None
        self.t0 = 0.0
        self.last_push = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started = time.time()
            self.t0 = now
        if phase == "text":
            self.progress(0.0, desc="Encoding the prompt…")
        elif phase == "denoise":
            if done < total and now - self.last_push < PROGRESS_EVERY_S:
                return
            per_step = (now - self.t0) / max(done, 1)
            eta = per_step * (total - done)
            self.progress((done, total), desc=f"Denoising · ~{_s(eta)} left", unit="steps")
        elif phase == "decode":
            self.progress((total, total), desc="Decoding with the VAE…", unit="steps")
        self.last_push = now


@dataclass
class _Inputs:
    """The form's components, in the order generate() takes them (the API's argument order)."""

    prompt: gr.Textbox
    negative: gr.Textbox
    width: gr.Number
    height: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    count: gr.Slider

    def as_list(self) -> list[gr.components.Component]:
        return [self.prompt, self.negative, self.width, self.height, self.steps, self.guidance, self.seed, self.count]


class Studio:
    """Holds the engine and the per-session jobs; its methods are the page's event handlers."""

    def __init__(self, engine: Any, ops: Any, settings: Any):
        self.engine = engine
        self.ops = ops
        self.settings = settings
        self.blocks: gr.Blocks | None = None
        self._jobs: dict[str, Any] = {}  # session hash -> its running Job
        self._jobs_lock = threading.Lock()
        w, _h = engine.default_size
        self.tiers = size_tiers(w, settings.max_size)

    # --- generation ----------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        negative_prompt: str,
        width: float,
        height: float,
        steps: float,
        guidance: float,
        seed: float,
        count: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it through this default
    ):
        """Run the job on a worker thread. When Gradio cancels this task (the Cancel button,
        gradio_client's Job.cancel(), a closed tab), the engine job is cancelled too, so the
        pipeline stops within a step instead of running on for nobody."""
        job = self.engine.new_job()
        session = getattr(request, "session_hash", None) or ""
        with self._jobs_lock:
            self._jobs[session] = job
        try:
            return await anyio.to_thread.run_sync(
                self._generate,
                job,
                (prompt, negative_prompt, width, height, steps, guidance, seed, count),
                _who(request),
                progress,
                abandon_on_cancel=True,
            )
        except anyio.get_cancelled_exc_class():
            job.cancel()
            raise
        finally:
            with self._jobs_lock:
                if self._jobs.get(session) is job:
                    del self._jobs[session]

    def _generate(self, job: Any, values: tuple, user: str, progress: gr.Progress):
        prompt, negative_prompt, width, height, steps, guidance, seed, count = values
        engine = self.engine
        feed = _Progress(progress)
        try:
            self._wait_for_model(progress, job)
            req = GenerationRequest(
                prompt=prompt if prompt is not None else "",
                negative_prompt=negative_prompt or "",
                width=_number(width),
                height=_number(height),
                steps=_number(steps),
                guidance=guidance if guidance is not None else 0.0,
                seed=_number(seed, -1),
                count=_number(count, 1),
                user=user,
            )
            result = engine.generate(req, job=job, progress=feed, save=True, wait_ready=30.0)
            progress(1.0, desc="Saving PNG…")
            paths = result.wait_saved(timeout=120)
        except ZImageError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - never a traceback to a client; the log has it
            log.exception("generate failed")
            raise gr.Error(INTERNAL_ERROR, print_exception=False) from None
        timings = result.timings.as_dict()
        details = {
            "seed": result.seeds[0],
            "seeds": list(result.seeds),
            "width": result.request.width,
            "height": result.request.height,
            "steps": result.request.steps,
            "guidance": result.request.guidance,
            "count": result.request.count,
            "prompt": result.request.prompt,
            "negative_prompt": result.request.negative_prompt,
            "files": [Path(p).name for p in paths],
            "model": result.model,
            "memory_mode": result.memory_mode,
            "device": result.device,
            "notes": list(result.notes),
            "timings": timings,
            "job": result.job_id,
            # inside the GPU lock: from the run's first progress call, for as long as the engine measured
            "gpu_started_at": feed.started,
            "gpu_finished_at": (feed.started or time.time()) + (result.timings.gpu_total or 0.0),
        }
        gallery = [(p, f"seed {s}") for p, s in zip(paths, result.seeds)]
        return gallery, details

    def _wait_for_model(self, progress: gr.Progress, job: Any) -> None:
        """A request made while loading holds its place and says what the model is doing."""
        engine = self.engine
        while not engine.ready:
            if job.cancelled:
                raise gr.Error("Cancelled while waiting for the model.", print_exception=False)
            if engine.load_error:
                raise gr.Error(f"The model failed to load: {engine.load_error}", print_exception=False)
            snap = engine.timeline.snapshot()
            progress(
                max(0.0, min(1.0, snap["percent"] / 100.0)),
                desc=f"Waiting for the model to load: {snap['current']} ({_s(snap['elapsed_s'])})",
            )
            time.sleep(0.25)

    def cancel(self, request: gr.Request) -> str:
        """Cancel this session's own job (queued or running); other people's jobs go on."""
        session = getattr(request, "session_hash", None) or ""
        with self._jobs_lock:
            job = self._jobs.get(session)
        if job is None:
            return "Nothing of yours is running."
        job.cancel()
        return "Cancelled: the run stops after the current step."

    def after_generate(self, details: dict[str, Any]):
        files = [str(self.engine.store.folder / Path(n).name) for n in (details or {}).get("files", [])]
        files = [f for f in files if Path(f).is_file()]
        seed = (details or {}).get("seed", -1)
        download = gr.update(value=files or None, visible=bool(files))
        return seed, summary_markdown(details), download, ""

    # --- history, parameters ------------------------------------------------------------

    def history(self):
        return history_items(self.engine.store.history(HISTORY_LIMIT))

    def select_image(self, evt: gr.SelectData):
        value = evt.value or {}
        image = value.get("image") if isinstance(value, dict) else None
        path = (image or {}).get("path") if isinstance(image, dict) else None
        if not path:
            return {}, "Select an image to see its parameters."
        if not self._may_read(path):  # the path comes from the browser: only our images
            return {}, "That image is not one of this studio's outputs."
        try:
            params = read_parameters(path)
        except Exception:  # noqa: BLE001 - a file that is not a readable PNG has no parameters
            params = {}
        return params, parameters_markdown(params, value.get("caption") or Path(path).name)

    def _may_read(self, path: str) -> bool:
        """Inside the outputs folder or Gradio's cache (where shown images are copied)."""
        from gradio.utils import get_upload_folder

        try:
            real = Path(path).resolve()
        except (OSError, RuntimeError):
            return False
        roots = (Path(self.engine.store.folder).resolve(), Path(get_upload_folder()).resolve())
        return real.suffix.lower() == ".png" and any(real.is_relative_to(r) for r in roots)

    def load_png(self, file: Any):
        """A PNG dropped on the page: its embedded parameters, and the form filled with them."""
        path = getattr(file, "name", file)
        no_change = [gr.update()] * 10
        if not path:
            return [{}, "", *no_change]
        name = Path(str(path)).name
        try:
            params = read_parameters(path)
        except Exception:  # noqa: BLE001 - not an image PIL can read
            return [{}, f"**{name}** is not a PNG image that zimage can read.", *no_change]
        if not params:
            return [
                {},
                f"**{name}** carries no zimage parameters (was it made by zimage with metadata on?).",
                *no_change,
            ]
        return [params, parameters_markdown(params, name), *self.use_settings(params)]

    def use_settings(self, params: dict[str, Any]):
        """Form values from a parameters dict: prompt, negative, width, height, steps, guidance, seed,
        count, aspect, tier."""
        if not params:
            return [gr.update()] * 10
        w = params.get("width")
        h = params.get("height")
        aspect, tier = (
            match_preset(int(w), int(h), self.tiers, self.settings.min_size, self.settings.max_size)
            if w and h
            else (CUSTOM, None)
        )
        return [
            params.get("prompt", gr.update()),
            params.get("negative_prompt", gr.update()),
            w if w else gr.update(),
            h if h else gr.update(),
            params.get("steps", gr.update()),
            params.get("guidance", gr.update()),
            params.get("seed", gr.update()),
            1,  # the image's own seed, one image
            aspect,
            tier if tier is not None else gr.update(),
        ]

    # --- small form helpers ---------------------------------------------------------------

    def pick_preset(self, aspect: str, tier: Any):
        if aspect == CUSTOM or tier is None:
            return gr.update(), gr.update(), gr.update()
        w, h, note = preset_size(aspect, int(tier), self.settings.min_size, self.settings.max_size)
        return w, h, size_note(w, h, note)

    def custom_size(self, width: Any, height: Any):
        return CUSTOM, size_note(width, height)

    @staticmethod
    def negative_state(guidance: float):
        if guidance and float(guidance) > 0:
            return gr.update(
                interactive=True,
                info=f"In use: guidance {float(guidance):g} runs a second pass per step with it (about 2× slower).",
                elem_classes=["zi-negative"],
            )
        return gr.update(
            interactive=False,
            info="Inactive while guidance is 0: Z-Image-Turbo then ignores the negative prompt. "
            "Raise guidance to use it.",
            elem_classes=["zi-negative", "zi-inactive"],
        )

    # --- live panel ----------------------------------------------------------------------

    def tick(self):
        status = self.engine.status()
        try:
            ops_status = self.ops.status() if self.ops is not None else {}
        except Exception:  # noqa: BLE001 - the panel must keep answering
            log.exception("ops.status failed")
            ops_status = {"status": "unavailable (see log)"}
        return render_profiler(status, ops_status, self.gradio_waiting()), render_banner(status)

    def gradio_waiting(self) -> int:
        """Requests waiting in Gradio's queue (not yet handed to the engine)."""
        queue = getattr(self.blocks, "_queue", None)
        try:
            return len(queue) if queue is not None else 0
        except Exception:  # noqa: BLE001 - Gradio internals; a reading must never break the panel
            return 0


def _number(value: Any, default: int | None = None) -> Any:
    """Whole numbers from Gradio widgets (which may send floats) stay exact; the engine validates the rest."""
    if value is None or value == "":
        return default if default is not None else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# ------------------------------------------------------------------------------------------
# the page


def build_ui(engine: Any, ops: Any, settings: Any) -> gr.Blocks:
    """The studio page around an injected engine (no global pipeline)."""
    studio = Studio(engine, ops, settings)
    w0, h0 = engine.default_size
    aspect0, tier0 = match_preset(w0, h0, studio.tiers, settings.min_size, settings.max_size)
    examples = load_examples()
    preset = engine.preset

    with gr.Blocks(
        title="zimage studio",
        analytics_enabled=False,
        delete_cache=CACHE_SWEEP,
        fill_width=True,
    ) as demo:
        studio.blocks = demo
        last_seed = gr.State(-1)
        selected_params = gr.State({})

        with gr.Row(elem_id="zi-header", equal_height=True):
            gr.HTML(
                f'<div class="zi-brand">{_logo_svg()}<div><h1>zimage <span>studio</span></h1>'
                f"<p>{_e(preset.description or preset.name)}</p></div></div>",
                elem_id="zi-brand",
                scale=3,
            )
            banner = gr.HTML(render_banner(engine.status()), elem_id="zi-banner", scale=4)

        with gr.Row(elem_id="zi-main", equal_height=False):
            # ---------------- the form
            with gr.Column(scale=4, min_width=330, elem_id="zi-form"):
                with gr.Group(elem_classes=["zi-card-group"]):
                    prompt = gr.Textbox(
                        label="Prompt",
                        placeholder="Describe the picture… (Enter generates, Shift+Enter adds a line)",
                        lines=1,
                        max_lines=8,
                        autofocus=True,
                        elem_id="zi-prompt",
                        max_length=settings.max_prompt_chars,
                    )
                    negative = gr.Textbox(
                        label="Negative prompt",
                        placeholder="What to avoid",
                        lines=1,
                        max_lines=4,
                        elem_id="zi-negative",
                        max_length=settings.max_prompt_chars,
                        **_neg_kwargs(studio.negative_state(0.0)),
                    )
                with gr.Row(elem_id="zi-actions"):
                    generate_btn = gr.Button("Generate", variant="primary", size="lg", elem_id="zi-generate", scale=3)
                    cancel_btn = gr.Button("Cancel", variant="secondary", size="lg", elem_id="zi-cancel", scale=1)
                cancel_note = gr.Markdown("", elem_id="zi-cancel-note")

                with gr.Group(elem_classes=["zi-card-group"]):
                    aspect = gr.Radio(
                        [ratio_label(r) for r in ASPECT_RATIOS] + [CUSTOM],
                        value=aspect0,
                        label="Aspect ratio",
                        elem_id="zi-aspect",
                    )
                    tier = gr.Radio(
                        list(studio.tiers),
                        value=tier0 if tier0 is not None else w0,
                        label="Resolution (about N×N pixels)",
                        elem_id="zi-tier",
                    )
                    with gr.Row():
                        width = gr.Number(value=w0, label="Width", precision=0, step=16, elem_id="zi-width")
                        height = gr.Number(value=h0, label="Height", precision=0, step=16, elem_id="zi-height")
                    size_md = gr.Markdown(size_note(w0, h0), elem_classes=["zi-size-note"])

                with gr.Group(elem_classes=["zi-card-group"]):
                    seed = gr.Number(
                        value=-1,
                        label="Seed",
                        info="-1 picks a random seed; the seed actually used is shown with the result.",
                        precision=0,
                        minimum=-1,
                        maximum=SEED_MAX,
                        elem_id="zi-seed",
                    )
                    with gr.Row(elem_id="zi-seed-buttons"):
                        random_btn = gr.Button("Random (-1)", size="sm", elem_id="zi-seed-random")
                        reuse_btn = gr.Button("♻ Reuse last", size="sm", elem_id="zi-seed-reuse")
                    steps = gr.Slider(
                        1,
                        settings.max_steps,
                        value=settings.default_steps,
                        step=1,
                        precision=0,
                        label="Steps",
                        info=f"Z-Image-Turbo is distilled for {preset.default_steps} steps.",
                        elem_id="zi-steps",
                    )
                    guidance = gr.Slider(
                        0.0,
                        GUIDANCE_MAX,
                        value=0.0,
                        step=0.5,
                        label="Guidance",
                        info="0 = off, the Turbo default. Above 0 the negative prompt is used.",
                        elem_id="zi-guidance",
                    )
                    count = gr.Slider(
                        1,
                        settings.max_count,
                        value=1,
                        step=1,
                        precision=0,
                        label="Images",
                        info="Seeds s, s+1, … (image i equals a single run with seed s+i).",
                        elem_id="zi-count",
                    )

            # ---------------- results, history, parameters
            with gr.Column(scale=6, min_width=420, elem_id="zi-output"):
                with gr.Tabs(elem_id="zi-tabs"):
                    with gr.Tab("Result", id="result"):
                        gallery = gr.Gallery(
                            label="Result",
                            show_label=False,
                            columns=2,
                            height=500,
                            object_fit="contain",
                            buttons=["download", "fullscreen"],
                            elem_id="zi-gallery",
                            preview=True,
                        )
                        summary = gr.Markdown("", elem_id="zi-summary")
                        download = gr.File(
                            label="Download PNG (parameters embedded)",
                            file_count="multiple",
                            visible=False,
                            elem_id="zi-download",
                        )
                        with gr.Accordion("Details (JSON)", open=False):
                            details = gr.JSON(label="Details", elem_id="zi-details")
                    with gr.Tab("History", id="history") as history_tab:
                        with gr.Row(equal_height=True):
                            gr.Markdown(
                                "Saved outputs, newest first. Select one to see its parameters.",
                                elem_classes=["zi-hint"],
                            )
                            refresh_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=110)
                        history = gr.Gallery(
                            label="History",
                            show_label=False,
                            columns=5,
                            height=460,
                            object_fit="cover",
                            buttons=["download", "fullscreen"],
                            elem_id="zi-history",
                        )
                    with gr.Tab("Load a PNG", id="load"):
                        dropped = gr.File(
                            label="Drop a PNG made by zimage here to load its settings",
                            file_types=[".png"],
                            type="filepath",
                            height=180,
                            elem_id="zi-drop",
                        )
                with gr.Group(elem_id="zi-params"):
                    params_md = gr.Markdown(
                        "Select an image (result or history) to see its parameters.", elem_id="zi-params-md"
                    )
                    with gr.Row(elem_id="zi-params-actions"):
                        use_btn = gr.Button("Use these settings", size="sm", scale=0, min_width=170, elem_id="zi-use")

                if examples:
                    gr.Examples(
                        examples=[[e["prompt"]] for e in examples],
                        inputs=[prompt],
                        label="Example prompts · 示例",
                        examples_per_page=10,
                        elem_id="zi-examples",
                    )

            # ---------------- the live profiler
            with gr.Column(scale=3, min_width=290, elem_id="zi-side"):
                gr.HTML('<div class="zi-side-title">Live profiler</div>', elem_id="zi-side-head")
                profiler = gr.HTML(render_profiler(engine.status()), elem_id="zi-profiler")

        inputs = _Inputs(prompt, negative, width, height, steps, guidance, seed, count)
        form_outputs = [*inputs.as_list(), aspect, tier]

        # one GPU job at a time across every listener: one concurrency group, and the engine lock
        gen_event = gr.on(
            triggers=[generate_btn.click, prompt.submit],
            fn=studio.generate,
            inputs=inputs.as_list(),
            outputs=[gallery, details],
            api_name="generate",
            api_description=API_DESCRIPTION,
            concurrency_id=GPU_QUEUE,
            concurrency_limit=1,
            show_progress="full",
            show_progress_on=[gallery],
            # raw values reach the engine, whose validation names the field, the value and what is
            # allowed (Gradio's own bounds check says only "Value 100 is greater than maximum value 8")
            preprocess=False,
        )
        gen_event.success(
            studio.after_generate,
            inputs=[details],
            outputs=[last_seed, summary, download, cancel_note],
            queue=False,
            api_visibility="private",
        )
        cancel_btn.click(
            studio.cancel,
            outputs=[cancel_note],
            cancels=[gen_event],
            queue=False,
            api_name="cancel",
            api_description="Cancel the job of this session (client); other sessions' jobs go on.",
        )

        aspect.input(
            studio.pick_preset, [aspect, tier], [width, height, size_md], queue=False, api_visibility="private"
        )
        tier.input(studio.pick_preset, [aspect, tier], [width, height, size_md], queue=False, api_visibility="private")
        for box in (width, height):
            box.input(studio.custom_size, [width, height], [aspect, size_md], queue=False, api_visibility="private")
        guidance.change(studio.negative_state, [guidance], [negative], queue=False, api_visibility="private")
        random_btn.click(lambda: -1, outputs=[seed], queue=False, api_visibility="private")
        reuse_btn.click(lambda s: s, inputs=[last_seed], outputs=[seed], queue=False, api_visibility="private")

        for g in (gallery, history):
            g.select(
                studio.select_image,
                outputs=[selected_params, params_md],
                queue=False,
                api_visibility="private",
            )
        use_btn.click(studio.use_settings, [selected_params], form_outputs, queue=False, api_visibility="private")
        dropped.upload(
            studio.load_png,
            [dropped],
            [selected_params, params_md, *form_outputs],
            queue=False,
            api_visibility="private",
        )
        # Read from disk when looked at (Gradio hashes and copies every file it shows into its
        # cache, so the history is not refreshed after every run nobody is watching).
        for trigger in (history_tab.select, refresh_btn.click):
            trigger(studio.history, outputs=[history], queue=False, api_visibility="private")

        # live panel: queue=False so it answers while the GPU is busy
        timer = gr.Timer(1.0)
        timer.tick(
            studio.tick, outputs=[profiler, banner], queue=False, show_progress="hidden", api_visibility="private"
        )
        demo.load(
            studio.tick, outputs=[profiler, banner], queue=False, show_progress="hidden", api_visibility="private"
        )

    demo.queue(max_size=settings.queue_size, api_open=False, default_concurrency_limit=1)
    return demo


def _neg_kwargs(update: dict[str, Any]) -> dict[str, Any]:
    """Initial Textbox kwargs from a gr.update dict (so the first render matches later updates)."""
    return {k: v for k, v in update.items() if k in ("interactive", "info", "elem_classes")}
