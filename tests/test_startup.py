"""Start-up: serve at once on the eager path, compile beside, switch between jobs; the compile
artifacts' keys, invalidation and fallbacks; importing only what runs.

The compile here is the real torch.compile (Dynamo traces the tiny model's blocks) with a cheap
backend that runs the traced graph as it is: Inductor on two CPU cores takes minutes, and the
logic under test is the same. A test backend can also hold the compile at a gate, so a test
decides when the switch lands.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest

from zimage.model import artifacts
from zimage.model.imports import MODULES, import_class
from zimage.service.engine import Engine
from zimage.service.request import GenerationRequest

from .support import ROOT, pixels


def graph_as_is(gm, _example_inputs):
    """A torch.compile backend: run the graph Dynamo traced, unchanged."""
    return gm.forward


class GatedBackend:
    """A torch.compile backend that waits for `gate` before handing back the traced graph."""

    def __init__(self, fail: bool = False):
        self.gate = threading.Event()
        self.calls = 0
        self.fail = fail

    def __call__(self, gm, example_inputs):
        self.calls += 1
        assert self.gate.wait(120), "the test never opened the gate"
        if self.fail:
            raise RuntimeError("no compiler here")
        return gm.forward


def request(seed: int = 7, steps: int = 3) -> GenerationRequest:
    return GenerationRequest("a red fox in the snow", width=64, height=64, steps=steps, seed=seed)


def compiled_engine(make_settings, backend, **kw) -> Engine:
    settings = make_settings(compile="regional", warmup=True, default_width=64, default_height=64, **kw)
    engine = Engine(settings)
    engine.compile_backend = backend
    return engine


def counter(engine: Engine, path: str) -> float:
    return engine.metrics.jobs_by_path.labels(path)._value.get()


# ------------------------------------------------------------------------------------------
# the switch


def test_ready_at_once_and_the_switch_lands_between_jobs(make_settings, engine):
    """Ready on the eager path while the blocks compile; a switch that lands during a job leaves
    that job on the eager path (same picture as an eager engine), and the next job is compiled."""
    import torch._dynamo

    torch._dynamo.reset()
    backend = GatedBackend()
    eng = compiled_engine(make_settings, backend)
    eng.load()
    try:
        assert eng.ready and eng.compiler.state == "compiling" and not eng.compiler.live
        assert eng.speed_phrase().startswith("ready (full speed in about ")
        assert eng.status()["speed"]["full_speed"] is False
        assert eng.metrics.full_speed._value.get() == 0

        landed = []

        def progress(phase, done, _total):
            if phase == "denoise" and done == 1 and not landed:
                backend.gate.set()  # the compile finishes while this job runs
                landed.append(eng.compiler.wait(120) and eng.compiler.live)

        during = eng.generate(request(), progress=progress, save=False)
        after = eng.generate(request(), save=False)
    finally:
        backend.gate.set()
        eng.shutdown(5)
    assert landed == [True]
    assert during.compute_path == "eager" and after.compute_path == "compiled"
    reference = engine.generate(request(), save=False)  # the compile-off engine of conftest
    assert np.array_equal(pixels(during.images[0]), pixels(reference.images[0]))
    diff = np.abs(pixels(after.images[0]) - pixels(reference.images[0]))
    assert diff.max() <= 1
    assert counter(eng, "eager") == 1 and counter(eng, "compiled") == 1
    assert eng.speed_phrase() == "ready (full speed)" and eng.metrics.full_speed._value.get() == 1
    assert backend.calls >= 1
    assert any("compiled" in n for n in eng.notes)


def test_the_compile_starts_after_the_eager_warm_up(make_settings):
    """Not beside it: the compile thread's Python would hold the GIL through the warm-up and make
    /ready late (H200: a 1.5 s warm-up took 6.1 s beside a compile from artifacts)."""
    import torch._dynamo

    torch._dynamo.reset()
    backend = GatedBackend()
    backend.gate.set()
    eng = compiled_engine(make_settings, backend)
    eng.load()
    try:
        assert eng.compiler.wait(120) and eng.compiler.live
    finally:
        eng.shutdown(5)
    warm = next(st for st in eng.timeline.snapshot()["stages"] if st["name"] == "warm-up")
    marks = {m["name"]: m["at_s"] for m in eng.compiler.snapshot()["stages"]}
    # both on the load timeline's clock (seconds since the process started), rounded to 1 ms
    assert marks["compile start"] >= warm["start_s"] + warm["duration_s"] - 0.002, (warm, marks)


def test_a_failed_compile_keeps_serving_eager(make_settings, caplog):
    import torch._dynamo

    torch._dynamo.reset()
    backend = GatedBackend(fail=True)
    backend.gate.set()
    eng = compiled_engine(make_settings, backend)
    with caplog.at_level(logging.WARNING, logger="zimage.model.compiler"):
        eng.load()
        assert eng.compiler.wait(120)
    try:
        assert eng.compiler.state == "failed" and "no compiler here" in eng.compiler.error
        result = eng.generate(request(), save=False)
        assert result.compute_path == "eager"
        assert eng.speed_phrase() == "ready (eager speed: the compile failed)"
        assert not any(getattr(m, "_compiled_call_impl", None) for m in eng.pipe.transformer.modules())
    finally:
        eng.shutdown(5)
    assert len([r for r in caplog.records if r.getMessage().startswith("compile failed")]) == 1


def test_a_corrupt_artifact_falls_back_to_a_clean_compile_with_one_log_line(make_settings, tmp_path, caplog):
    import torch._dynamo

    torch._dynamo.reset()
    eng = compiled_engine(make_settings, "aot_eager", compile_cache_dir=str(tmp_path / "cache"))
    # the folder this start will look in: same model, mode and options as the engine's compiler
    from zimage.model.compiler import artifact_key

    probe = Engine(eng.settings.replace(compile="off", warmup=False))
    probe.load()
    key = artifact_key(probe.model, eng.settings, "regional", "aot_eager")
    artifacts.save(eng.settings.compile_cache_dir, key, 1.0, data=b"not a compile artifact " * 40)
    folder = artifacts.folder_for(eng.settings.compile_cache_dir, key)
    (folder / artifacts.BLOB).write_bytes(b"flipped bits" * 10)  # no longer matches its checksum
    with caplog.at_level(logging.WARNING, logger="zimage.model.artifacts"):
        eng.load()
        assert eng.compiler.wait(180)
    try:
        assert eng.compiler.state == "live", eng.compiler.error
        assert eng.compiler.artifacts.status == "corrupt"
        assert eng.generate(request(), save=False).compute_path == "compiled"
    finally:
        eng.shutdown(5)
    lines = [r.getMessage() for r in caplog.records if r.name == "zimage.model.artifacts"]
    assert len(lines) == 1 and "corrupt" in lines[0] and "compiling afresh" in lines[0]
    assert not (folder / artifacts.BLOB).exists() or artifacts.read_record(folder)["key"] == dataclasses.asdict(key)


# ------------------------------------------------------------------------------------------
# artifact keys and files (no compile)


def key(**changes) -> artifacts.ArtifactKey:
    base = dict(
        torch="2.11.0+cu130",
        cuda="13.0",
        device="NVIDIA H200",
        capability="9.0",
        model="abc",
        compile_mode="regional",
        options="bfloat16",
        diffusers="0.42.1",
        zimage="0.1.0",
    )
    base.update(changes)
    return artifacts.ArtifactKey(**base)


@pytest.mark.parametrize(
    "field,value",
    [
        ("torch", "2.12.0"),
        ("cuda", "12.8"),
        ("device", "NVIDIA H100 80GB HBM3"),
        ("capability", "8.0"),
        ("model", "abd"),
        ("compile_mode", "regional-max-autotune"),
        ("options", "float16"),
        ("diffusers", "0.43.0"),
        ("zimage", "0.2.0"),
    ],
)
def test_every_part_of_the_key_names_its_own_folder(tmp_path, field, value):
    a, b = key(), key(**{field: value})
    assert a.digest() == key().digest() and a.digest() != b.digest()
    artifacts.save(tmp_path, a, 5.0, data=b"blob")
    assert artifacts.load(tmp_path, b).status == "missing"  # a new key builds its own


def test_model_identity_follows_configs_and_shard_sizes(tmp_path):
    model = tmp_path / "m"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    (model / "transformer" / "config.json").write_text('{"dim": 32}')
    shard = model / "transformer" / "w.safetensors"
    shard.write_bytes(b"x" * 100)
    first = artifacts.model_identity(model)
    shard.write_bytes(b"y" * 100)  # same size: not re-hashed (19 GiB would cost more than a compile)
    assert artifacts.model_identity(model) == first
    shard.write_bytes(b"y" * 101)
    second = artifacts.model_identity(model)
    assert second != first
    (model / "transformer" / "config.json").write_text('{"dim": 64}')
    assert artifacts.model_identity(model) not in (first, second)


def test_foreign_and_corrupt_artifacts_are_ignored_with_one_line_each(tmp_path, caplog):
    k = key()
    folder = artifacts.folder_for(tmp_path, k)
    with caplog.at_level(logging.WARNING, logger="zimage.model.artifacts"):
        assert artifacts.load(tmp_path, k).status == "missing"  # nothing there: no log line

        artifacts.save(tmp_path, k, 5.0, data=b"blob")
        record = json.loads((folder / artifacts.KEY_FILE).read_text())
        record["key"]["torch"] = "1.0"  # made by another torch: copied in from elsewhere
        (folder / artifacts.KEY_FILE).write_text(json.dumps(record))
        assert artifacts.load(tmp_path, k).status == "foreign" and not folder.exists()

        artifacts.save(tmp_path, k, 5.0, data=b"blob")
        (folder / artifacts.BLOB).write_bytes(b"blub")
        assert artifacts.load(tmp_path, k).status == "corrupt" and not folder.exists()

        artifacts.save(tmp_path, k, 5.0, data=b"sound checksum, but not torch's format")
        assert artifacts.load(tmp_path, k).status == "corrupt" and not folder.exists()
    lines = [r.getMessage() for r in caplog.records if r.name == "zimage.model.artifacts"]
    assert len(lines) == 3
    assert "foreign" in lines[0] and "corrupt" in lines[1] and "corrupt" in lines[2]
    assert all("compiling afresh" in line for line in lines)


@pytest.mark.slow
def test_artifacts_of_a_real_inductor_compile_load_in_a_fresh_process(tmp_path):
    """Mega-Cache end to end: a compile saves, a new process with an empty Inductor cache loads the
    blob and its compile is served from it (an FX-graph cache hit)."""
    script = """
import os, sys, json
os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[2]
import torch
from torch._dynamo.utils import counters
from zimage.model import artifacts
k = artifacts.ArtifactKey(torch.__version__, "none", "cpu", "", "m", "regional", "t", "0", "0")
status = artifacts.load(sys.argv[1], k).status
f = torch.compile(lambda x: (x.sin() + 1).sum(), dynamic=True)
f(torch.randn(8))
if status != "loaded":
    artifacts.save(sys.argv[1], k, 1.0)
print(json.dumps({"status": status, "hits": counters["inductor"]["fxgraph_cache_hit"]}))
"""
    runs = []
    for n in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "store"), str(tmp_path / f"inductor{n}")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"status": "missing", "hits": 0}
    assert runs[1]["status"] == "loaded" and runs[1]["hits"] >= 1


# ------------------------------------------------------------------------------------------
# importing only what runs


def test_each_model_class_comes_from_its_own_module():
    import diffusers
    import transformers

    for (library, name), module in MODULES.items():
        cls = import_class(library, name)
        assert cls.__module__ == module
        assert cls is getattr(diffusers if library == "diffusers" else transformers, name)


def test_a_compile_from_artifacts_notes_its_time_for_the_next_estimate(tmp_path):
    k = key()
    artifacts.save(tmp_path, k, 25.0, data=b"blob")
    artifacts.record_cached_seconds(tmp_path, k, 10.64)
    record = artifacts.read_record(artifacts.folder_for(tmp_path, k))
    assert record["compile_seconds"] == 25.0 and record["cached_seconds"] == 10.64
    artifacts.record_cached_seconds(tmp_path, key(torch="other"), 3.0)  # no such artifacts: nothing written
    assert not artifacts.folder_for(tmp_path, key(torch="other")).exists()
