"""The bench's toolbox row (image to image vs text to image, LoRA switching) on the CPU with a tiny
model in the full-size layout; the numbers mean nothing here, the plumbing does."""

import json

import pytest

from .support import bench_model, run_python


@pytest.mark.slow
def test_toolbox_row_measures_img2img_and_lora_switches(tmp_path):
    model = bench_model(tmp_path / "model")
    settings = json.dumps({"lora_mode": "hotswap", "bench_lora_rank": 4, "warmup": False})
    proc = run_python(
        ["-m", "zimage", "bench", "row", "--kind", "toolbox", "--model", str(model)]
        + ["--size", "64", "--steps", "4", "--runs", "1", "--workdir", str(tmp_path / "work"), "--settings", settings],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_ROW ")][-1][len("BENCH_ROW ") :])
    assert row["text_to_image"]["steps"] == 4 and row["image_to_image_0_5"]["steps"] == 2
    assert row["image_to_image_0_5"]["vae_encode_s"] > 0 and row["image_to_image_0_5"]["denoise_vs_text_to_image"] > 0
    lora = row["lora"]
    assert row["lora_mode"] == "hotswap" and lora["graphs_compiled_by_switches"] == 0
    assert len(lora["switch_apply_s"]) == 4 and lora["denoise_with_lora_s"] > 0 and lora["cost_per_image"] is not None
