"""`pip install .` gives a package that finds its own files: the studio's static assets and the
full-size model configs travel as package data, not as files beside a checkout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .support import ROOT

pytestmark = pytest.mark.slow  # pip and a fresh Python in subprocesses (~10 s)

CHECK = """
import json, sys
import zimage
from zimage.model.fullsize import CONFIGS
from zimage.web import page

configs = json.loads(CONFIGS.read_text())
print(json.dumps({
    "package": zimage.__file__,
    "assets": sorted(p.name for p in page.ASSETS.iterdir()),
    "examples": len(page.load_examples()),
    "css": len((page.ASSETS / "studio.css").read_text()),
    "configs": CONFIGS.as_posix(),
    "transformer_dim": configs["transformer/config.json"]["dim"],
}))
"""


def test_pip_install_carries_static_assets_and_configs(tmp_path):
    source, target, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    # a copy of the tracked tree: the build must not write into the checkout
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    out = subprocess.run([*pip, str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    elsewhere.mkdir()
    run = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r})\n{CHECK}"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(str(target)), got  # the installed copy, not the checkout
    assert {"examples.json", "logo.svg", "studio.css"} <= set(got["assets"])
    assert got["examples"] >= 10 and got["css"] > 0
    assert got["configs"].startswith(str(target)) and got["transformer_dim"] == 3840
