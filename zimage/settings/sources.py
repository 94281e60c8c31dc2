"""Where settings come from: command line > environment (ZIMAGE_*) > YAML file > defaults.
One flag per field (``add_arguments``), one coercion per type with one clear sentence when a
value does not fit."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from zimage.errors import SettingsError
from zimage.settings.checks import check
from zimage.settings.fields import ENV_PREFIX, FIELD_TYPES, Settings

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any, source: str) -> Any:
    tp = FIELD_TYPES[name]
    try:
        if value is None:
            return None
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if tp is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if isinstance(value, bool):  # YAML reads a bare off/on/no/yes as a boolean
            return "on" if value else "off"
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "a whole number", float: "a number"}.get(tp, "text")
        raise SettingsError(f"Setting '{name}' from {source} must be {kind} (got {value!r}).") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise SettingsError(f"Cannot read settings file {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"Settings file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SettingsError(f"Settings file {path} is not valid YAML{where}: {problem}.") from None
    if not isinstance(data, dict):
        raise SettingsError(f"Settings file {path} must be a mapping of setting: value.")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_TYPES:
            raise SettingsError(f"Unknown setting '{key}' in {path}. Run --help for the list.")
        out[name] = _coerce(name, value, str(path))
    return out


def _read_env(environ: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name in FIELD_TYPES:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            out[name] = _coerce(name, environ[key], key)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; unset flags are left out of the namespace."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(Settings):
        group_name = f.metadata.get("group", "general")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} settings")
        group = groups[group_name]
        flag = "--" + f.name.replace("_", "-")
        tp = FIELD_TYPES[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata.get('help', '')} [env {env}; default {default!r}]"
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif tp is tuple:
            group.add_argument(flag, action="append", metavar="VALUE", **kw)
        else:
            choices = f.metadata.get("choices")
            group.add_argument(flag, type=str, choices=choices, metavar=None if choices else "VALUE", **kw)


def from_sources(
    cli: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Build Settings: CLI values > environment > YAML file > defaults."""
    cli = {k: v for k, v in (cli or {}).items() if k in FIELD_TYPES}
    environ = dict(os.environ if environ is None else environ)
    env_values = _read_env(environ)
    path = cli.get("config") or config_path or env_values.get("config")
    values: dict[str, Any] = {}
    if path:
        if not Path(path).is_file():
            raise SettingsError(f"Settings file {path} does not exist.")
        values.update(_read_yaml(Path(path)))
        values["config"] = str(path)
    elif Path("zimage.yaml").is_file():
        values.update(_read_yaml(Path("zimage.yaml")))
        values["config"] = "zimage.yaml"
    if "gradio_cache_dir" not in env_values and environ.get("GRADIO_TEMP_DIR"):
        # Gradio's own variable names zimage's cache folder too, below ZIMAGE_GRADIO_CACHE_DIR
        env_values["gradio_cache_dir"] = environ["GRADIO_TEMP_DIR"]
    values.update(env_values)
    for name, value in cli.items():
        values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    return check(Settings(**values))


def from_namespace(ns: argparse.Namespace) -> Settings:
    return from_sources(cli=vars(ns))


def describe(s: Settings) -> list[tuple[str, Any, str]]:
    """(name, value, help) rows, for `zimage doctor` and the docs."""
    return [(f.name, getattr(s, f.name), f.metadata.get("help", "")) for f in fields(Settings)]
