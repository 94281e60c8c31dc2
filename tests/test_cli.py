"""`python -m zimage generate` end to end in a real subprocess: files, sizes, exit codes, messages."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from zimage.service.store import read_parameters

from .support import ROOT

pytestmark = pytest.mark.slow  # every test runs python -m zimage in a subprocess


def run(args, tiny_dir, tmp_path, env_extra=None, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), ZIMAGE_TINY_DIR=str(tiny_dir))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "zimage", *args],
        cwd=tmp_path,
        env=dict(env, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_writes_png_of_requested_size(tiny_dir, tmp_path):
    out = run(
        [
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "a lighthouse",
            "--output",
            "pics/lh.png",
            "--seed",
            "9",
            "--width",
            "192",
            "--height",
            "128",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--min-size",
            "64",
        ],
        tiny_dir,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    path = tmp_path / "pics" / "lh.png"
    assert "wrote pics/lh.png (seed 9, 192x128)" in out.stdout
    assert "text encoder" in out.stdout and "VAE decode" in out.stdout and "steps" in out.stdout
    with Image.open(path) as im:
        assert im.size == (192, 128)
    meta = read_parameters(path)
    assert meta["seed"] == 9 and meta["steps"] == 3 and meta["prompt"] == "a lighthouse"


def test_generate_count_and_json(tiny_dir, tmp_path):
    out = run(
        [
            "generate",
            "--model",
            "tiny",
            "--prompt",
            "boats",
            "--output",
            "b.png",
            "--seed",
            "100",
            "--count",
            "2",
            "--json",
            "--device",
            "cpu",
            "--no-png-metadata",
        ],
        tiny_dir,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["seeds"] == [100, 101] and data["paths"] == ["b-1.png", "b-2.png"]
    assert read_parameters(tmp_path / "b-1.png") == {}  # metadata off
    assert data["timings"]["text_encoder_s"] > 0 and len(data["timings"]["steps_s"]) == 8


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--width", "1000"], "Width must be a multiple of 16 between 256 and 2048 (got 1000). Try 992."),
        (["--steps", "0"], "Steps must be a whole number from 1 to 50 (got 0)."),
        (["--seed", "abc"], "Seed must be -1 (random) or a whole number"),
        (["--count", "9"], "Count must be a whole number from 1 to 8 (got 9)."),
        (["--guidance", "11"], "Guidance must be a number from 0 to 10 (got 11.0)."),
        (["--output", "x.jpg"], "Output must be a .png file"),
        (["--memory-mode", "huge"], "invalid choice: 'huge'"),
        (["--port", "x"], "'port' from --port must be a whole number"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_dir, tmp_path, args, fragment):
    out = run(["generate", "--model", "tiny", "--prompt", "x", "--device", "cpu", *args], tiny_dir, tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert fragment in lines[-1], out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.glob("*.png"))


def test_empty_prompt_exits_2(tiny_dir, tmp_path):
    out = run(["generate", "--model", "tiny", "--prompt", "  ", "--device", "cpu"], tiny_dir, tmp_path)
    assert out.returncode == 2 and "Prompt must be a non-empty text" in out.stderr


def test_missing_model_exits_3_with_advice(tiny_dir, tmp_path):
    out = run(["generate", "--prompt", "x", "--device", "cpu"], tiny_dir, tmp_path)
    assert out.returncode == 3, out.stderr
    assert "ZIMAGE_MODEL" in out.stderr and "--model tiny" in out.stderr and "Traceback" not in out.stderr


def test_no_command_prints_help(tiny_dir, tmp_path):
    out = run([], tiny_dir, tmp_path)
    assert out.returncode == 0 and "generate" in out.stdout


def test_an_output_that_cannot_be_written_exits_1_with_one_line(tiny_dir, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the folder should be")
    out = run(
        ["generate", "--model", "tiny", "--prompt", "x", "--device", "cpu", "--width", "64", "--height", "64",
         "--min-size", "64", "--output", str(blocker / "result.png")],
        tiny_dir,
        tmp_path,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert (
        out.stderr.strip().splitlines()[-1]
        == f"error: Could not write {blocker / 'result.png'}: a file stands where the folder should be."
    )
    assert "Traceback" not in out.stderr
