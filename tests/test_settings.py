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
