"""HTML and Markdown for the page's panels: the live profiler, the banner, a run's summary, an
image's parameters. Pure functions of plain data (engine.status(), ops.status(), a details dict),
tested without a server."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from zimage.service.store import seed_in_name
from zimage.units import human_bytes

# ------------------------------------------------------------------------------------------
# formatting for the profiler panel and the banner (pure: tested without a server)


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


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
        _replicas_card(status.get("replicas") or []),
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
        rows.append(_kv(f"VRAM {i} in use", human_bytes(g.get("allocated_bytes"))))
        rows.append(_kv(f"VRAM {i} peak", human_bytes(g.get("peak_allocated_bytes"))))
        rows.append(
            _kv(
                "reserved now / peak",
                f"{human_bytes(g.get('reserved_bytes'))} / {human_bytes(g.get('peak_reserved_bytes'))}",
                "zi-sub",
            )
        )
    if not mem.get("gpus"):
        rows.append(_kv("VRAM", "no GPU in use"))
    rows.append(_kv("Process memory", human_bytes(mem.get("host_rss_bytes"))))
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


def _replicas_card(rows: list[dict[str, Any]]) -> str:
    """One short row per replica (several GPUs): state, job step, VRAM, last run, restarts."""
    if len(rows) < 2:
        return ""  # one replica: the other cards already say it all
    out = []
    for r in rows:
        state = r.get("state", "?")
        if r.get("step"):
            state = f"{state} {r['step'][0]}/{r['step'][1]}"
        vram = r.get("vram") or {}
        mem = human_bytes(vram.get("allocated_bytes")) if vram.get("allocated_bytes") is not None else "-"
        last = r.get("last_run") or {}
        last_text = f"{_s(last.get('seconds'))} {last.get('outcome', '')}".strip() if last else "no run yet"
        extra = f" · {r['restarts']} restart(s)" if r.get("restarts") else ""
        title = r.get("error") or r.get("device_name") or ""
        out.append(
            f'<div class="zi-kv zi-replica zi-replica-{_e(r.get("state", ""))}" title="{_e(title)}">'
            f"<span>{_e(r.get('name', '?'))}</span><b>{_e(state)} · {_e(mem)} · {_e(last_text)}{_e(extra)}</b></div>"
        )
    return _card("zi-replicas", f"Replicas · {len(rows)}", "".join(out))


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
    speed = status.get("speed") or {}
    if speed.get("full_speed", True):
        pace = ""
    elif speed.get("state") == "failed":
        pace = " · eager speed (the compile failed)"
    else:
        eta = speed.get("eta_s")
        pace = f" · full speed in about {eta:.0f} s" if eta is not None else " · compiling"
    return (
        '<div class="zi-banner zi-banner-ready"><span class="zi-dot"></span><b>Ready</b> · '
        f"{_e(status.get('model', ''))} on {_e(device)} · mode {_e(status.get('memory_mode'))}{_e(pace)}</div>"
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


def history_items(paths: list[Path]) -> list[tuple[str, str]]:
    items = []
    for p in paths:
        seed = seed_in_name(p.name)
        items.append((str(p), f"seed {seed}" if seed is not None else p.stem))
    return items
