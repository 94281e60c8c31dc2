"""How the page looks: its static assets (css, js, logo, example prompts), the theme, the options
server.py mounts the page with, and the header."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from zimage.web.i18n import gradio_i18n, t
from zimage.web.panels import _e

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "static"  # package data: found the same once pip-installed


def load_examples(path: Path | None = None) -> list[dict[str, str]]:
    """Example prompts ({lang, prompt}) from static/examples.json; [] when the file is missing."""
    path = path or ASSETS / "examples.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("no example prompts: cannot read %s", path)
        return []
    items = data.get("examples", []) if isinstance(data, dict) else data
    return [e for e in items if isinstance(e, dict) and isinstance(e.get("prompt"), str)]


def _asset(name: str) -> str:
    try:
        return (ASSETS / name).read_text(encoding="utf-8")
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
        body_background_fill_dark="*neutral_950",
        block_radius="14px",
        button_large_radius="12px",
    )


def page_options() -> dict[str, Any]:
    """Keyword arguments for gr.mount_gradio_app: theme, css, js, translations, favicon."""
    css = ASSETS / "studio.css"
    logo = ASSETS / "logo.svg"
    return {
        "theme": theme(),
        "css_paths": [css] if css.is_file() else [],
        "js": _asset("studio.js") or None,
        "i18n": gradio_i18n(),
        "favicon_path": str(logo) if logo.is_file() else None,
    }


def bilingual(key: str) -> str:
    """Static HTML in both languages; the stylesheet shows the one of the page's language."""
    return f'<span class="zi-en">{_e(t("en", key))}</span><span class="zi-zh">{_e(t("zh-CN", key))}</span>'


def _header_html(preset: Any, logins: bool) -> str:
    """The brand, and the tools at its right: language, light/dark, and log out when logins are on
    (Gradio's own /logout). The buttons work through static/studio.js."""
    tools = (
        '<button id="zi-lang" class="zi-tool" title="English / 简体中文">中文 / EN</button>'
        f'<button id="zi-theme" class="zi-tool" title="{_e(t("en", "theme"))}">◐</button>'
    )
    if logins:
        tools += f'<a id="zi-logout" class="zi-tool" href="logout">{bilingual("logout")}</a>'
    return (
        f'<div class="zi-brand">{_asset("logo.svg")}<div class="zi-title"><h1>zimage <span>studio</span></h1>'
        f'<p>{_e(preset.description or preset.name)}</p></div><div class="zi-tools">{tools}</div></div>'
    )
