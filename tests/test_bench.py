"""The benchmark's plumbing on the CPU: rows in fresh processes, JSON and table (numbers mean nothing here)."""

import json

import pytest

from .support import bench_model, run_python

pytestmark = pytest.mark.slow  # python -m zimage bench in a subprocess


def test_bench_run_writes_rows_and_table(tmp_path):
    """Engine-only rows and a row through the real app (app.py, gradio_client), with the tiny
    model's architecture on the CPU; the app row also shows the start order: the model load
    begins before Gradio is imported and the page is built."""
    model = bench_model(tmp_path / "model")
    out = tmp_path / "results.json"
    proc = run_python(
        [
            "-m",
            "zimage",
            "bench",
            "run",
            "--model",
            str(model),
            "--rows",
            "plain-warm,zimage-warm,app-warm",
            "--size",
            "128",
            "--runs",
            "1",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["env"]["torch"] and results["env"]["device"] == "cpu"
    plain, ours = results["rows"]["plain-warm"], results["rows"]["zimage-warm"]
    assert "error" not in plain and "error" not in ours, (plain.get("error"), ours.get("error"))
    for row in (plain, ours):
        assert row["start_to_ready_s"] > 0 and row["warm_median_s"] > 0 and row["first_image_s"] > 0
    assert ours["memory_mode"] == "cpu" and ours["with_saving"]["request_to_png_alone_s"] > 0
    assert [s["name"] for s in ours["load_timeline"]][:2] == ["find model", "import torch"]
    assert "| zimage-warm |" in proc.stdout and "| plain-warm |" in proc.stdout and "| app-warm |" in proc.stdout
    app = results["rows"]["app-warm"]
    assert "error" not in app, app.get("error")
    assert 0 < app["page_up_s"] and 0 < app["ready_s"] <= app["first_image_s"] <= app["full_speed_s"]
    assert app["ready_body"]["status"] == "ready (full speed)" and app["ready_body"]["compile"] == "eager-only"
    assert app["warm_latency_median_s"] > 0 and len(app["images"]) >= 1 and app["exit_code"] == 0
    stages = {s["name"]: s for s in app["load_timeline"]}
    assert stages["import torch"]["start_s"] < app["page_built_s"]  # the load began before the page build
