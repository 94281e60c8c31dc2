"""Settings come from the command line > environment > YAML file > defaults, with clear errors."""

import subprocess
import sys
from dataclasses import fields

import pytest

from zimage.errors import SettingsError
from zimage.settings import Settings, from_sources

from .support import ROOT


def test_defaults():
    s = from_sources({}, environ={})
    assert s.model == "Tongyi-MAI/Z-Image-Turbo" and s.port == 7860 and s.queue_size == 16
    assert s.default_steps == 8 and s.min_size == 256 and s.max_size == 2048


def test_precedence_cli_over_env_over_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "z.yaml"
    cfg.write_text("port: 8001\nqueue_size: 3\nmmap: true\nmax_count: 4\n")
    env = {"ZIMAGE_PORT": "8002", "ZIMAGE_QUEUE_SIZE": "5"}
    s = from_sources({"port": "8003"}, environ=env, config_path=str(cfg))
    assert s.port == 8003  # CLI
    assert s.queue_size == 5  # env beats YAML
    assert s.mmap is True and s.max_count == 4  # YAML beats defaults
    assert s.config == str(cfg)


def test_zimage_yaml_in_cwd_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zimage.yaml").write_text("compile: off\nwarmup: false\nload-threads: 3\n")
    s = from_sources({}, environ={})
    assert s.compile == "off" and s.warmup is False and s.load_threads == 3


def test_env_bool_and_list(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    s = from_sources({}, environ={"ZIMAGE_SHARE": "yes", "ZIMAGE_AUTH": "a:1, b:2"})
    assert s.share is True and s.auth == ("a:1", "b:2")


@pytest.mark.parametrize(
    "cli,message",
    [
        ({"port": "eighty"}, "'port' from --port must be a whole number"),
        ({"port": "70000"}, "'port' must be within 1..65535"),
        ({"min_size": "100"}, "'min_size' must be a multiple of 16"),
        ({"memory_mode": "huge"}, "'memory_mode' must be one of"),
        ({"auth": ["nopassword"]}, "user:password"),
        ({"memory_fraction": "2"}, "within 0..1"),
        ({"config": "/nonexistent/z.yaml"}, "does not exist"),
        (
            {"lora_files": ["/nonexistent/style.safetensors"]},
            "Setting 'lora_files': '/nonexistent/style.safetensors' is",
        ),
    ],
)
def test_bad_settings_are_named(cli, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as info:
        from_sources(cli, environ={})
    assert message in str(info.value)


def test_unknown_yaml_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zimage.yaml").write_text("prot: 1\n")
    with pytest.raises(SettingsError, match="Unknown setting 'prot'"):
        from_sources({}, environ={})


def test_env_bad_value_names_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match="ZIMAGE_WARMUP"):
        from_sources({}, environ={"ZIMAGE_WARMUP": "maybe"})


@pytest.mark.slow  # a Python process per entry point
@pytest.mark.parametrize("entry", [["-m", "zimage", "--help"], ["app.py", "--help"]])
def test_help_lists_every_setting(entry):
    out = subprocess.run([sys.executable, *entry], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for f in fields(Settings):
        assert "--" + f.name.replace("_", "-") in out.stdout, f.name


def test_settings_change_only_through_replace():
    """Read once and passed down: no part can change the settings another part holds."""
    import dataclasses

    s = from_sources({}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    t = s.replace(port=8000, queue_size=3)
    assert (s.port, s.queue_size) == (7860, 16) and (t.port, t.queue_size) == (8000, 3)
    assert dataclasses.replace(t, port=7860, queue_size=16) == s


# ------------------------------------------------------------------------------------------
# every setting validated at start: one line, exit 2; legitimate edge values work

BAD_SETTINGS = [
    # (environment, extra arguments, zimage.yaml bytes or None, what the one line must say)
    ({"ZIMAGE_MAX_COUNT": "0"}, [], None, "'max_count' must be within 1..256 (got 0)"),
    ({"ZIMAGE_MAX_STEPS": "1"}, [], None, "'default_steps' must be within 1..max_steps (1) (got 8)"),
    ({"ZIMAGE_PURGE_EVERY_MINUTES": "inf"}, [], None, "'purge_every_minutes' must be a finite number (got inf)"),
    ({"ZIMAGE_PURGE_MAX_AGE_HOURS": "nan"}, [], None, "'purge_max_age_hours' must be a finite number (got nan)"),
    ({"ZIMAGE_SHUTDOWN_GRACE_S": "-5"}, [], None, "'shutdown_grace_s' must be within 0..86400 (got -5.0)"),
    ({"ZIMAGE_PURGE_MAX_GIB": "-1"}, [], None, "'purge_max_gib' must be within 0..1000000 (got -1.0)"),
    ({"ZIMAGE_WATCHDOG_RESERVED_GIB": "-inf"}, [], None, "'watchdog_reserved_gib' must be a finite number"),
    ({"ZIMAGE_MEMORY_FRACTION": "NaN"}, [], None, "'memory_fraction' must be a finite number"),
    ({"ZIMAGE_MIN_FREE_MIB": "-1"}, [], None, "'min_free_mib' must be within 0..1073741824 (got -1)"),
    ({"ZIMAGE_PURGE_MAX_COUNT": "-3"}, [], None, "'purge_max_count' must be at least 0 (got -3)"),
    ({}, ["--queue-size", "0"], None, "'queue_size' must be within 1..100000 (got 0)"),
    ({}, ["--port", "99999"], None, "'port' must be within 1..65535"),
    ({"ZIMAGE_DEVICE": "gpu"}, [], None, "'device' must be auto, cpu, cuda or cuda:N"),
    ({"ZIMAGE_WARMUP_SIZES": "100x100"}, [], None, "'warmup_sizes': 100x100 must have sides"),
    ({"ZIMAGE_DEFAULT_WIDTH": "4096"}, [], None, "'default_width' must be 0 (the preset's) or within"),
    ({"ZIMAGE_ROOT_PATH": "studio"}, [], None, "'root_path' must be empty or start with '/'"),
    ({"ZIMAGE_AUTH": "nopassword"}, [], None, "user:password"),
    ({"GRADIO_TEMP_DIR": "/proc/nope"}, [], None, "cannot create /proc/nope"),
    ({"ZIMAGE_GRADIO_CACHE_DIR": "/"}, [], None, "'gradio_cache_dir' (GRADIO_TEMP_DIR) is /, a folder above"),
    ({}, [], b"max_count: 4\nprompt: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 24)"),
    ({}, [], b"port: [\n", "is not valid YAML at line 2, column 1"),
    ({}, [], b"- a list\n", "must be a mapping of setting: value"),
]


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["app.py"], ["-m", "zimage", "serve"]], ids=["app.py", "zimage-serve"])
@pytest.mark.parametrize("env, args, yaml_bytes, message", BAD_SETTINGS, ids=[m for *_, m in BAD_SETTINGS])
def test_bad_settings_give_one_line_and_exit_2(entry, env, args, yaml_bytes, message, tmp_path, tiny_dir):
    """The real entry points, as a user starts them: no traceback, one line on stderr, exit code 2."""
    import os

    if yaml_bytes is not None:
        (tmp_path / "zimage.yaml").write_bytes(yaml_bytes)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_") and k != "GRADIO_TEMP_DIR"}
    full_env.update({"GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "PYTHONPATH": str(ROOT), **env})
    entry = [str(ROOT / entry[0])] if entry == ["app.py"] else entry
    cmd = [sys.executable, *entry, "--model", "tiny", "--tiny-dir", str(tiny_dir), "--port", "1", *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60)
    lines = out.stderr.splitlines()
    assert (out.returncode, len(lines)) == (2, 1), out.stderr[-2000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "outputs").exists()  # refused before anything was made


@pytest.mark.parametrize(
    "env",
    [{"ZIMAGE_MAX_COUNT": "1"}, {"ZIMAGE_MAX_STEPS": "1", "ZIMAGE_DEFAULT_STEPS": "1"}],
    ids=["one-image", "one-step"],
)
def test_one_image_or_one_step_builds_the_page(env, tiny_dir, tmp_path):
    """Gradio refuses a slider whose minimum equals its maximum: the page shows a fixed number instead."""
    import gradio as gr

    from zimage.service.engine import Engine
    from zimage.web.page import build_ui

    base = {"ZIMAGE_MODEL": "tiny", "ZIMAGE_TINY_DIR": str(tiny_dir), "ZIMAGE_OUTPUTS_DIR": str(tmp_path / "out")}
    settings = from_sources({}, environ={**base, **env}, config_path=None)
    engine = Engine(settings)
    demo = build_ui(engine, None, settings)
    widgets = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    fixed = widgets["zi-count"] if "ZIMAGE_MAX_COUNT" in env else widgets["zi-steps"]
    other = widgets["zi-steps"] if "ZIMAGE_MAX_COUNT" in env else widgets["zi-count"]
    assert isinstance(fixed, gr.Number) and fixed.value == 1 and fixed.interactive is False
    assert "allows only 1" in fixed.info
    assert isinstance(other, gr.Slider) and other.minimum == 1 and other.maximum > 1
    engine.store.close()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"purge_every_minutes": "inf"}, "finite"),
        ({"purge_every_minutes": "-1"}, "within 0..525600"),
        ({"shutdown_grace_s": "nan"}, "finite"),
        ({"max_count": "0"}, "within 1..256"),
        ({"max_steps": "0"}, "within 1..1000"),
        ({"load_threads": "0"}, "within 1..256"),
        ({"watchdog_strikes": "0"}, "within 1..10000"),
        ({"min_size": "512", "max_size": "256"}, "'min_size' must be at most max_size"),
        ({"model": " "}, "'model' must not be empty"),
        ({"outputs_dir": ""}, "'outputs_dir' must not be empty"),
    ],
)
def test_numbers_and_paths_are_checked(values, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_sources(values, environ={})


def test_legitimate_edge_values_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = from_sources(
        {"max_count": "1", "max_steps": "1", "default_steps": "1", "purge_every_minutes": "0", "min_free_mib": "0"},
        environ={"GRADIO_TEMP_DIR": str(tmp_path / "g")},
    )
    assert (s.max_count, s.max_steps, s.default_steps, s.purge_every_minutes) == (1, 1, 1, 0.0)
    assert s.gradio_cache_dir == str(tmp_path / "g")  # Gradio's own variable is honoured...
    s = from_sources({}, environ={"GRADIO_TEMP_DIR": "/a", "ZIMAGE_GRADIO_CACHE_DIR": str(tmp_path / "z")})
    assert s.gradio_cache_dir == str(tmp_path / "z")  # ...below zimage's
