"""The memory policy (a pure function of the hardware), the modes on the CPU, and the OOM ladder."""

import numpy as np
import pytest
import torch

from zimage.errors import OutOfMemory
from zimage.model.memory import (
    Footprint,
    GPUInfo,
    Hardware,
    cap_per_gpu,
    choose_mode,
    host_embedding,
    is_oom,
    is_unrecoverable_cuda,
    next_lower,
    parse_max_memory,
)
from zimage.service.engine import Engine
from zimage.service.request import GenerationRequest

from .support import pixels

GiB = 1 << 30
# The real model's sizes (bf16, text encoder trimmed), as footprint() reads them from the headers.
REAL = Footprint(
    transformer=int(11.46 * GiB),
    text_encoder=int(7.3 * GiB),
    vae=int(0.16 * GiB),
    activations=3 * GiB,
    transformer_block=int(0.33 * GiB),
    text_layer=int(0.19 * GiB),
)


def gpus(*free_total):
    return tuple(GPUInfo(i, f"GPU{i}", int(t * GiB), int(f * GiB)) for i, (f, t) in enumerate(free_total))


def hw(*free_total, host=64):
    return Hardware(gpus(*free_total), host * GiB, host * GiB)


TABLE = [
    # (hardware, requested, expected mode, expected execution device)
    (Hardware((), 32 * GiB, 30 * GiB), "auto", "cpu", "cpu"),
    (hw((79, 80)), "auto", "gpu", "cuda:0"),
    (hw((23.5, 24)), "auto", "gpu", "cuda:0"),  # a 24 GB card holds it all
    (hw((15.5, 16)), "auto", "balanced", "cuda:0"),  # 16 GB card
    (hw((11.8, 12)), "auto", "lowvram", "cuda:0"),  # 12 GB: the transformer does not fit
    (hw((7.6, 8)), "auto", "lowvram", "cuda:0"),  # 8 GB card
    (hw((3.5, 4)), "auto", "sequential-offload", "cuda:0"),
    (hw((15.5, 16), (15.5, 16)), "auto", "multi-gpu", "cuda:0"),  # two 16 GB cards
    (hw((2, 80), (79, 80)), "auto", "gpu", "cuda:1"),  # the free GPU is chosen
    (hw((79, 80)), "lowvram", "lowvram", "cuda:0"),  # the setting wins
    (hw((79, 80)), "model-offload", "model-offload", "cuda:0"),
    (Hardware((), 32 * GiB, 30 * GiB), "gpu", "cpu", "cpu"),  # no GPU: says why
]


@pytest.mark.parametrize("hardware,requested,mode,device", TABLE)
def test_policy_table(hardware, requested, mode, device):
    plan = choose_mode(hardware, REAL, requested)
    assert plan.mode == mode, plan.reason
    assert plan.execution_device == device
    assert plan.reason  # every choice says why


def test_policy_reasons_are_specific():
    plan = choose_mode(hw((15.5, 16)), REAL, "auto")
    assert "15.5 GiB free" in plan.reason and "streaming the text encoder" in plan.reason
    assert plan.placement == {"transformer": "cuda:0", "vae": "cuda:0", "text_encoder": "cpu"}
    plan = choose_mode(Hardware(), REAL, "gpu")
    assert "needs a CUDA GPU" in plan.reason
    multi = choose_mode(hw((15.5, 16), (15.5, 16)), REAL, "auto")
    assert multi.placement["text_encoder"] == "cuda:1" and multi.placement["transformer"] == "cuda:0"


def test_ladder_order():
    assert next_lower("gpu") == "balanced"
    assert next_lower("balanced") == "lowvram"
    assert next_lower("lowvram") == "sequential-offload"
    assert next_lower("sequential-offload") is None
    assert next_lower("cpu") is None


def test_error_classification():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert is_unrecoverable_cuda(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_unrecoverable_cuda(torch.OutOfMemoryError("CUDA out of memory"))


REQ = GenerationRequest("a red lighthouse at dusk", width=128, height=96, steps=4, seed=2024)


@pytest.fixture(scope="module")
def cpu_reference(make_settings):
    eng = Engine(make_settings())
    eng.load()
    return eng.generate(REQ, save=False).images[0]


@pytest.mark.parametrize("mode", ["balanced", "lowvram"])
def test_streaming_modes_give_the_same_image_on_cpu(mode, make_settings, cpu_reference):
    """Without a GPU the streaming hooks still run (CPU to CPU): same picture as the plain CPU mode."""
    eng = Engine(make_settings(memory_mode=mode))
    eng.load()
    assert eng.plan.mode == mode and "saves nothing" in eng.plan.reason
    assert any("streamed" in n for n in eng.notes)
    image = eng.generate(REQ, save=False).images[0]
    assert np.array_equal(pixels(image), pixels(cpu_reference))
    te = eng.pipe.text_encoder
    # the embedding table stays a plain attribute: the offload hooks never see (nor copy) it
    embed = host_embedding(te)
    assert embed is not None and te.embed_tokens is None
    assert all(m is not embed for m in te.modules())


def test_vae_tiling_and_slicing_are_offered(make_settings):
    eng = Engine(make_settings(vae_tiling=True, vae_slicing=True, attention_slicing=True))
    eng.load()
    assert eng.pipe.vae.use_tiling and eng.pipe.vae.use_slicing
    assert any("attention slicing: no effect" in n for n in eng.notes)


class _OomOnce:
    """Raise CUDA's out-of-memory error the first `times` calls, then behave."""

    def __init__(self, fn, times=1):
        self.fn, self.left = fn, times

    def __call__(self, *a, **k):
        if self.left > 0:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by a test)")
        return self.fn(*a, **k)


def test_oom_in_decode_retries_with_vae_tiling(make_settings):
    eng = Engine(make_settings())
    eng.load()
    vae = eng.pipe.vae
    vae.decode = _OomOnce(vae.decode)
    before = eng.metrics.oom._value.get()
    result = eng.generate(REQ, save=False)
    assert vae.use_tiling
    assert any("VAE tiling" in n and "out of GPU memory" in n for n in result.notes)
    assert eng.metrics.oom._value.get() == before + 1
    assert eng.generate(REQ, save=False).images  # the next request works, no restart


def test_oom_in_denoise_moves_down_a_mode(make_settings, cpu_reference):
    eng = Engine(make_settings(memory_mode="balanced"))
    eng.load()
    tr = eng.pipe.transformer
    original = tr.forward
    tr.forward = _OomOnce(original)
    result = eng.generate(REQ, save=False)
    assert eng.plan.mode == "lowvram"
    assert any("memory mode lowvram" in n for n in result.notes)
    assert np.array_equal(pixels(result.images[0]), pixels(cpu_reference))


def test_oom_twice_gives_a_clear_error_and_the_server_recovers(make_settings):
    eng = Engine(make_settings())
    eng.load()
    vae = eng.pipe.vae
    vae.decode = _OomOnce(vae.decode, times=2)
    with pytest.raises(OutOfMemory) as info:
        eng.generate(REQ, save=False)
    msg = str(info.value)
    assert "Out of GPU memory at 128x96" in msg and "Try a smaller size" in msg and "next request" in msg
    assert eng.metrics.requests.labels("oom")._value.get() == 1
    assert eng.generate(REQ, save=False).images


def test_max_memory_is_respected():
    caps = parse_max_memory("0=12GiB, 1=16GiB")
    assert caps == {0: 12 * GiB, 1: 16 * GiB}
    two_big = hw((79, 80), (79, 80))
    assert choose_mode(two_big, REAL, "auto").mode == "gpu"
    plan = choose_mode(cap_per_gpu(two_big, caps), REAL, "auto")
    assert plan.mode == "multi-gpu"
    assert plan.placement == {"transformer": "cuda:1", "vae": "cuda:1", "text_encoder": "cuda:0"}
    assert parse_max_memory("0=1.5GB") == {0: 1_500_000_000}
    with pytest.raises(ValueError, match="0=20GiB"):
        parse_max_memory("lots")


def test_bad_max_memory_setting_is_named():
    from zimage.errors import SettingsError
    from zimage.settings import from_sources

    with pytest.raises(SettingsError, match="gpu_max_memory"):
        from_sources({"gpu_max_memory": "0:20"}, environ={})
