"""HTML and Markdown for the page's panels: the live profiler, the banner, a run's summary, an
image's parameters. Pure functions of plain data (engine.status(), ops.status(), a details dict),
tested without a server."""

from __future__ import annotations

import html
import json
import re
import time
from typing import Any

from zimage.units import human_bytes
from zimage.web.i18n import t

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


def render_profiler(
    status: dict[str, Any],
    ops_status: dict[str, Any] | None = None,
    queue: dict[str, Any] | int | None = None,
    lang: str = "en",
) -> str:
    """The live profiler panel as HTML, from engine.status(), ops.status() and Gradio's queue
    ({waiting, users: {user: count}}, or just a count)."""
    if not isinstance(queue, dict):
        queue = {"waiting": int(queue or 0), "users": {}}
    sections = [
        _last_run_card(status.get("last"), lang),
        _effect_card(status, lang),
        _memory_card(status.get("memory") or {}, lang),
        _queue_card(status, queue, lang),
        _replicas_card(status.get("replicas") or [], lang),
        _load_card(status.get("load") or {}, lang),
    ]
    if ops_status:
        sections.append(_ops_card(ops_status, lang))
    return '<div class="zi-prof">' + "".join(sections) + "</div>"


def _card(cls: str, title: str, body: str) -> str:
    return f'<section class="zi-card {cls}"><h4>{_e(title)}</h4>{body}</section>'


def _kv(key: str, value: Any, cls: str = "") -> str:
    return f'<div class="zi-kv {cls}"><span>{_e(key)}</span><b>{_e(value)}</b></div>'


def _last_run_card(last: dict[str, Any] | None, lang: str = "en") -> str:
    if not last:
        return _card("zi-last", t(lang, "c_last"), f'<p class="zi-muted">{_e(t(lang, "c_no_image"))}</p>')
    tm = _timings_dict(last.get("timings"))
    steps = tm.get("steps_s") or []
    total = tm.get("total_s") or 0.0
    png = tm.get("png_s")
    rows = [
        (t(lang, "c_text"), tm.get("text_encoder_s"), ""),
        (
            t(lang, "c_denoise"),
            tm.get("denoise_s"),
            f"{t(lang, 'c_steps', n=len(steps))} · {tm.get('it_per_s', 0):.2f} it/s",
        ),
        (t(lang, "c_vae"), tm.get("vae_decode_s"), ""),
        (t(lang, "c_host"), tm.get("to_host_s"), ""),
        (t(lang, "c_png"), png, "" if png is not None else t(lang, "c_writing")),
    ]
    when = last.get("when")
    ago = f" · {t(lang, 'c_ago', t=_uptime(time.time() - when))}" if when else ""
    seeds = last.get("seeds") or []
    seed_text = (f"seed {seeds[0]}" + (f"…{seeds[-1]}" if len(seeds) > 1 else "")) if seeds else ""
    body = (
        f'<div class="zi-headline"><b>{_e(_s(total))}</b><span>{tm.get("it_per_s", 0):.2f} it/s</span></div>'
        + _bar_rows(rows, max(total, png or 0.0))
        + f'<div class="zi-total"><span>{_e(t(lang, "c_queue_wait"))} {_e(_s(tm.get("queue_wait_s")))}</span>'
        f"<span>{_e(last.get('size', ''))} × {_e(last.get('count', 1))}</span></div>"
        f'<p class="zi-muted">{_e(t(lang, "c_steps", n=last.get("steps", "")))} · {_e(seed_text)}{_e(ago)}</p>'
    )
    if last.get("notes"):
        body += '<ul class="zi-notes">' + "".join(f"<li>{_e(n)}</li>" for n in last["notes"]) + "</ul>"
    return _card("zi-last", t(lang, "c_last"), body)


def _effect_card(status: dict[str, Any], lang: str = "en") -> str:
    mode = status.get("memory_mode")
    if not mode:
        return _card("zi-effect", t(lang, "c_effect"), f'<p class="zi-muted">{_e(t(lang, "c_decided"))}</p>')
    device = status.get("device_name") or status.get("device") or "?"
    chips = [
        f'<span class="zi-chip zi-chip-mode">{_e(t(lang, "c_mode"))} {_e(mode)}</span>',
        f'<span class="zi-chip">{_e(device)}</span>',
    ]
    if status.get("dtype"):
        chips.append(f'<span class="zi-chip">{_e(status["dtype"])}</span>')
    body = f'<div class="zi-chips">{"".join(chips)}</div>'
    if status.get("memory_reason"):
        body += f'<p class="zi-reason">{_e(status["memory_reason"])}</p>'
    notes = status.get("notes") or []
    if notes:
        body += '<ul class="zi-notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
    return _card("zi-effect", f"{t(lang, 'c_effect')} · {status.get('model', '')}", body)


def _memory_card(mem: dict[str, Any], lang: str = "en") -> str:
    rows = []
    for g in mem.get("gpus") or []:
        i = g.get("index")
        rows.append(_kv(t(lang, "c_vram_use", i=i), human_bytes(g.get("allocated_bytes"))))
        rows.append(_kv(t(lang, "c_vram_peak", i=i), human_bytes(g.get("peak_allocated_bytes"))))
        rows.append(
            _kv(
                t(lang, "c_reserved"),
                f"{human_bytes(g.get('reserved_bytes'))} / {human_bytes(g.get('peak_reserved_bytes'))}",
                "zi-sub",
            )
        )
    if not mem.get("gpus"):
        rows.append(_kv("VRAM", t(lang, "c_no_gpu")))
    rows.append(_kv(t(lang, "c_rss"), human_bytes(mem.get("host_rss_bytes"))))
    return _card("zi-mem", t(lang, "c_memory"), "".join(rows))


def _queue_card(status: dict[str, Any], queue: dict[str, Any], lang: str = "en") -> str:
    """How many wait (in Gradio's queue and at the engine's lock) and per user: never a prompt."""
    running = status.get("running_step")
    waiting = int(status.get("queue_depth") or 0) + int(queue.get("waiting") or 0)
    rows = [
        _kv(t(lang, "c_waiting"), waiting),
        _kv(t(lang, "c_running"), t(lang, "c_step_of", a=running[0], b=running[1]) if running else t(lang, "c_idle")),
    ]
    users = queue.get("users") or {}
    if waiting and any(u != "-" for u in users):
        shown = ", ".join(f"{u} {n}" for u, n in sorted(users.items(), key=lambda x: (-x[1], x[0])))
        rows.append(_kv(t(lang, "c_per_user"), shown, "zi-sub"))
    rows += [
        _kv(t(lang, "c_images"), status.get("images_made", 0)),
        _kv(t(lang, "c_uptime"), _uptime(status.get("uptime_s", 0))),
    ]
    if status.get("pending_writes"):
        rows.append(_kv(t(lang, "c_pending"), status["pending_writes"]))
    return _card("zi-queue", t(lang, "c_queue"), "".join(rows))


def _replicas_card(rows: list[dict[str, Any]], lang: str = "en") -> str:
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
        last_text = f"{_s(last.get('seconds'))} {last.get('outcome', '')}".strip() if last else t(lang, "c_no_run")
        extra = f" · {t(lang, 'c_restarts', n=r['restarts'])}" if r.get("restarts") else ""
        title = r.get("error") or r.get("device_name") or ""
        out.append(
            f'<div class="zi-kv zi-replica zi-replica-{_e(r.get("state", ""))}" title="{_e(title)}">'
            f"<span>{_e(r.get('name', '?'))}</span><b>{_e(state)} · {_e(mem)} · {_e(last_text)}{_e(extra)}</b></div>"
        )
    return _card("zi-replicas", f"{t(lang, 'c_replicas')} · {len(rows)}", "".join(out))


def _load_card(load: dict[str, Any], lang: str = "en") -> str:
    """The load timeline: each stage's full name on its own line above its bar."""
    stages = load.get("stages") or []
    rows = []
    if stages:
        end = max((s["start_s"] + (s["duration_s"] or 0.0)) for s in stages) or 1.0
        for st in stages:
            dur = st.get("duration_s")
            shown = _s(dur) if dur is not None else (t(lang, "c_failed") if load.get("error") else "…")
            rows.append(
                f'<div class="zi-row zi-stage" title="{_e(st.get("detail", ""))}">'
                f'<span class="zi-k">{_e(st["name"])}</span><span class="zi-v">{_e(shown)}</span>'
                f'<span class="zi-bar zi-gantt"><i style="margin-left:{100 * st["start_s"] / end:.1f}%;'
                f'width:{max(1.0, 100 * (dur or 0) / end):.1f}%"></i></span></div>'
            )
    if load.get("error"):
        rows.append(f'<p class="zi-error">{_e(t(lang, "c_load_failed", error=load["error"]))}</p>')
    elif load.get("ready_at_s") is not None:
        rows.append(f'<p class="zi-muted">{_e(t(lang, "c_ready_after", s=_s(load["ready_at_s"])))}</p>')
    else:
        line = t(
            lang, "c_loading", stage=load.get("current", "…"), pct=load.get("percent", 0), s=_s(load.get("elapsed_s"))
        )
        rows.append(f'<p class="zi-muted">{_e(line)}</p>')
    return _card("zi-load", t(lang, "c_load"), "".join(rows))


def _ops_card(ops_status: dict[str, Any], lang: str = "en") -> str:
    """Operations in plain words: a row per setting that says something; blanks and 'nothing yet' left out."""
    rows = []
    for key, value in ops_status.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        if key == "watchdog_exiting":
            if value is True:
                rows.append(_kv(t(lang, "o_watchdog_exiting"), t(lang, "o_yes_restarting"), "zi-warn"))
            continue
        if key == "purge" and value == "off":
            value = t(lang, "o_purge_off")
        if key == "purge_last_run" and value == "not yet":
            value = t(lang, "o_not_yet")
        label_key = f"o_{key}"
        label = t(lang, label_key)
        if label == label_key:  # a row this panel does not know yet: its key in words
            label = str(key).replace("_", " ").capitalize()
        if not isinstance(value, (str, int, float, bool)):
            value = json.dumps(value, default=str)
        rows.append(_kv(label, value))
    return _card("zi-ops", t(lang, "c_ops"), "".join(rows))


def render_banner(status: dict[str, Any], lang: str = "en") -> str:
    """The status pill at the top: loading progress, the load error, or what is serving."""
    load = status.get("load") or {}
    if load.get("error"):
        return (
            f'<div class="zi-banner zi-banner-error"><b>{_e(t(lang, "b_failed"))}</b> '
            f"{_e(load['error'])}<br><span>{_e(t(lang, 'b_fix'))}</span></div>"
        )
    if not status.get("ready"):
        pct = float(load.get("percent") or 0.0)
        return (
            '<div class="zi-banner zi-banner-loading">'
            f'<span class="zi-dot"></span><b>{_e(t(lang, "b_loading"))}</b> · {_e(load.get("current", "…"))} '
            f"{pct:.0f}% · {_e(_s(load.get('elapsed_s')))}"
            f'<span class="zi-progress"><i style="width:{max(3.0, pct):.0f}%"></i></span>'
            f"<span>{_e(t(lang, 'b_wait'))}</span></div>"
        )
    device = status.get("device_name") or status.get("device")
    speed = status.get("speed") or {}
    if speed.get("full_speed", True):
        pace = ""
    elif speed.get("state") == "failed":
        pace = " · " + t(lang, "b_eager_only")
    else:
        eta = speed.get("eta_s")
        pace = " · " + (t(lang, "b_full_in", n=f"{eta:.0f}") if eta is not None else t(lang, "b_compiling"))
    return (
        f'<div class="zi-banner zi-banner-ready"><span class="zi-dot"></span><b>{_e(t(lang, "b_ready"))}</b> · '
        f"<span>{_e(status.get('model', ''))} {_e(t(lang, 'b_on'))} {_e(device)} · {_e(t(lang, 'c_mode'))} "
        f"{_e(status.get('memory_mode'))}{_e(pace)}</span></div>"
    )


def summary_markdown(details: dict[str, Any], lang: str = "en") -> str:
    """One honest line about a finished run: the seed used, the size, the time of each stage."""
    if not details:
        return ""
    tm = details.get("timings") or {}
    seeds = details.get("seeds") or []
    seed_text = ", ".join(str(s) for s in seeds[:8]) + (" …" if len(seeds) > 8 else "")
    png = tm.get("png_s")
    head = (
        f"**{t(lang, 'sum_seed')} {seed_text}** · {details.get('width')}×{details.get('height')} · "
        f"{details.get('steps')} {t(lang, 'sum_steps')} · {t(lang, 'sum_guidance')} {details.get('guidance')}"
    )
    if details.get("shift") is not None:
        head += f" · {t(lang, 'p_shift')} {details['shift']:g}"
    lines = [
        head,
        f"{t(lang, 'sum_total')} **{_s(tm.get('total_s'))}** — {t(lang, 'sum_text')} {_s(tm.get('text_encoder_s'))} · "
        f"{t(lang, 'sum_denoise')} {_s(tm.get('denoise_s'))} ({tm.get('it_per_s', 0):.2f} it/s) · {t(lang, 'sum_vae')} "
        f"{_s(tm.get('vae_decode_s'))} · {t(lang, 'sum_png')} {_s(png)} · {t(lang, 'sum_mode')} "
        f"`{details.get('memory_mode')}` {t(lang, 'sum_on')} {details.get('device')}",
    ]
    for note in details.get("notes") or []:
        lines.append(f"⚠️ {note}")
    return "  \n".join(lines)


def parameters_markdown(params: dict[str, Any], name: str = "", lang: str = "en") -> str:
    """A selected or dropped image's parameters, in three short lines."""
    shown = {k: v for k, v in (params or {}).items() if not k.startswith("_")}
    if not shown:
        return t(lang, "no_parameters", name=name) if name else ""
    facts = []  # only what the image says (a dropped PNG may carry some fields and not others)
    if shown.get("seed") is not None:
        facts.append(f"{t(lang, 'p_seed')} `{shown['seed']}`")
    if shown.get("width") and shown.get("height"):
        facts.append(f"`{shown['width']}×{shown['height']}`")
    if shown.get("steps") is not None:
        facts.append(f"{shown['steps']} {t(lang, 'p_steps')}")
    if shown.get("guidance") is not None:
        facts.append(f"{t(lang, 'p_guidance')} {shown['guidance']}")
    if shown.get("shift") is not None:
        facts.append(f"{t(lang, 'p_shift')} {shown['shift']}")
    for key, label in (("model", "p_model"), ("memory_mode", "p_mode"), ("device", "p_on")):
        if shown.get(key):
            facts.append(f"{t(lang, label)} {shown[key]}")
    total = (shown.get("timings") or {}).get("total_s")
    if total is not None:
        facts.append(_s(total))
    if shown.get("created"):
        facts.append(f"{t(lang, 'p_created')} {str(shown['created']).replace('T', ' ')}")
    prompt = _md_text(shown.get("prompt", ""))
    lines = [f"**{_md_text(name)}** · {prompt}" if name else prompt]
    lines.append(" · ".join(facts))
    if shown.get("negative_prompt"):
        lines.append(f"{t(lang, 'p_negative')}: {_md_text(shown['negative_prompt'])}")
    return "  \n".join(lines)


def _md_text(value: Any) -> str:
    """Text shown inside Markdown as it is (a prompt may hold *, _, <, [ ...)."""
    text = " ".join(str(value).split())
    return html.escape(re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", text), quote=False)


# ------------------------------------------------------------------------------------------
# the live box of a run, the queue note, the token counter


def preview_data_url(rgb: Any) -> str:
    """A small RGB array as an inline PNG (the browser scales it up)."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_live(state: dict[str, Any], lang: str = "en") -> str:
    """The run's status above the result: what it is doing, a bar, the preview; or how it ended."""
    kind = state.get("state")
    if kind == "done":
        return f'<div class="zi-live zi-live-done">✓ {_e(t(lang, "live_done", s=_s(state.get("total_s"))))}</div>'
    if kind == "cancelled":
        key = {"closed": "live_cancelled_closed", "queue": "live_cancelled_queue"}.get(
            state.get("reason"), "live_cancelled"
        )
        return f'<div class="zi-live zi-live-cancelled">{_e(t(lang, key))}</div>'
    if kind != "running":
        return ""
    phase = state.get("phase")
    step, total = int(state.get("step") or 0), int(state.get("total") or 0)
    pct = 0.0
    if phase == "loading":
        text = t(lang, "live_loading", stage=state.get("stage", "…"), pct=f"{float(state.get('percent') or 0):.0f}")
    elif phase == "gpu":
        text = t(lang, "live_gpu")
    elif phase == "text":
        text = t(lang, "live_text")
    elif phase == "denoise":
        text = t(lang, "live_step", step=step, total=total)
        pct = 100.0 * step / total if total else 0.0
    elif phase == "decode":
        text, pct = t(lang, "live_decode"), 100.0
    elif phase == "save":
        text, pct = t(lang, "live_save"), 100.0
    else:
        text = t(lang, "live_starting")
    eta = state.get("eta_s")
    if eta is not None and phase in ("text", "denoise", "gpu"):
        text += " · " + t(lang, "live_eta", eta=_s(eta))
    img = ""
    frame = state.get("preview")
    if frame is not None:
        h, w = frame.rgb.shape[:2]
        img = (
            f'<img class="zi-preview" alt="preview, step {frame.step}" data-step="{frame.step}" '
            f'style="aspect-ratio:{w}/{h}" src="{preview_data_url(frame.rgb)}">'
        )
    return (
        f'<div class="zi-live zi-live-running"><div class="zi-live-line"><span class="zi-dot"></span>'
        f"<b>{_e(text)}</b></div>"
        f'<span class="zi-progress zi-live-bar"><i style="width:{max(2.0, pct):.0f}%"></i></span>{img}</div>'
    )


def render_queue_note(place: dict[str, Any] | None, lang: str = "en") -> str:
    """This tab's place in the queue and the time until its turn, from measured step times."""
    if not place:
        return ""
    n = place["place"]
    ordinal = f"{n}." if lang != "en" else _ordinal(n)
    eta = place.get("eta_s")
    if place.get("running_mine"):
        text = (
            t(lang, "queue_next", place=ordinal, eta=_s(eta))
            if eta is not None
            else t(lang, "queue_next_noeta", place=ordinal)
        )
    else:
        text = (
            t(lang, "queue_place", place=ordinal, eta=_s(eta))
            if eta is not None
            else t(lang, "queue_place_noeta", place=ordinal)
        )
    if lang != "en":
        text = text.replace(f"{n}.", str(n))
    return f'<div class="zi-queue-note"><span class="zi-dot"></span>{_e(text)}</div>'


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def render_tokens(n: int | None, limit: int, lang: str = "en") -> str:
    """The prompt's length in tokens, and a warning before the text encoder cuts it."""
    if n is None:
        return ""
    if n > limit:
        return f'<div class="zi-tokens zi-tokens-over">⚠ {_e(t(lang, "tokens_over", n=n, limit=limit, cut=n - limit))}</div>'
    if n > 0.85 * limit:
        return f'<div class="zi-tokens zi-tokens-near">{_e(t(lang, "tokens_near", n=n, limit=limit))}</div>'
    return f'<div class="zi-tokens">{_e(t(lang, "tokens", n=n, limit=limit))}</div>'
