"""The bench's toolbox row (image to image vs text to image, LoRA switching) on the CPU with a tiny
model in the full-size layout; the numbers mean nothing here, the plumbing does."""

import json
import os
import subprocess
import sys

import pytest

from zimage.model import tiny
from zimage.model.fullsize import CONFIGS, build

from .support import ROOT


@pytest.mark.slow
def test_toolbox_row_measures_img2img_and_lora_switches(tmp_path):
    cfgs = json.loads(CONFIGS.read_text())
    cfgs["transformer/config.json"] = dict(_class_name="ZImageTransformer2DModel", **tiny.TRANSFORMER_CONFIG)
    cfgs["text_encoder/config.json"] = dict(tiny.TEXT_ENCODER_CONFIG, vocab_size=16384, model_type="qwen3")
    cfgs["vae/config.json"] = dict(tiny.VAE_CONFIG)
    model = build(tmp_path / "model", device="cpu", configs=cfgs)
    settings = json.dumps({"lora_mode": "hotswap", "bench_lora_rank": 4, "warmup": False})
    proc = subprocess.run(
        [sys.executable, "-m", "zimage", "bench", "row", "--kind", "toolbox", "--model", str(model)]
        + ["--size", "64", "--steps", "4", "--runs", "1", "--workdir", str(tmp_path / "work"), "--settings", settings],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_ROW ")][-1][len("BENCH_ROW ") :])
    assert row["text_to_image"]["steps"] == 4 and row["image_to_image_0_5"]["steps"] == 2
    assert row["image_to_image_0_5"]["vae_encode_s"] > 0 and row["image_to_image_0_5"]["denoise_vs_text_to_image"] > 0
    lora = row["lora"]
    assert row["lora_mode"] == "hotswap" and lora["graphs_compiled_by_switches"] == 0
    assert len(lora["switch_apply_s"]) == 4 and lora["denoise_with_lora_s"] > 0 and lora["cost_per_image"] is not None
