"""Split mode (multi-gpu): every tensor is made on the device of the module that uses it.

On two GPUs the pipeline made its timesteps on its `_execution_device`, which diffusers takes
from the first component by name (the text encoder), and the transformer got them from the
wrong GPU. On the CPU every component sits on one device, so these tests make the pipeline's
execution device differ from the transformer's (the "meta" device, or a text encoder moved
there) and record the device of every tensor the transformer and the VAE are handed.
"""

from __future__ import annotations

import pytest
import torch

from zimage.model.memory import Footprint, GiB, GPUInfo, Hardware, MemoryMode, cap_per_gpu, choose_mode
from zimage.service.request import GenerationRequest

META = torch.device("meta")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _record_inputs(module, seen: list):
    """Forward pre-hooks on the module and every submodule: (name, device) of each tensor input."""
    handles = []
    for name, sub in module.named_modules():

        def hook(mod, args, kwargs, name=name):
            for t in _tensors((args, kwargs)):
                seen.append((name, t.device))

        handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@pytest.fixture()
def fresh_engine(make_settings):
    """An engine of its own: the tests move its components about."""
    from zimage.service.engine import Engine

    eng = Engine(make_settings())
    eng.load()
    yield eng
    eng.shutdown(grace_s=5)


def test_every_tensor_for_the_transformer_is_made_on_its_device(fresh_engine, monkeypatch):
    """With the pipeline's execution device elsewhere (as the text encoder's GPU is in a split),
    the transformer and the VAE still get every input on their own device."""
    from diffusers import ZImagePipeline

    # diffusers' own answer, as it is in a split: not the transformer's device
    monkeypatch.setattr(ZImagePipeline, "_execution_device", property(lambda self: META))
    pipe = fresh_engine.pipe
    seen_transformer: list = []
    seen_vae: list = []
    handles = _record_inputs(pipe.transformer, seen_transformer) + _record_inputs(pipe.vae, seen_vae)
    try:
        result = fresh_engine.generate(
            GenerationRequest("a red fox", width=128, height=128, steps=2, seed=3, count=2), save=False
        )
    finally:
        for h in handles:
            h.remove()
    assert len(result.images) == 2
    t_dev = next(pipe.transformer.parameters()).device
    v_dev = next(pipe.vae.parameters()).device
    names = {name for name, _ in seen_transformer}
    assert "t_embedder" in names and "" in names, names  # the timesteps and the top-level inputs were seen
    wrong = [(n, d) for n, d in seen_transformer if d != t_dev]
    assert not wrong, f"transformer inputs made on the wrong device: {wrong[:5]}"
    assert seen_vae and all(d == v_dev for _, d in seen_vae), seen_vae[:5]


def test_execution_device_is_the_transformers(fresh_engine):
    """A text encoder on another device no longer decides where the loop runs."""
    from diffusers import ZImagePipeline

    pipe = fresh_engine.pipe
    plain = ZImagePipeline(**pipe.components)  # what diffusers alone does with the same parts
    pipe.text_encoder.to(META)  # stands in for "the text encoder is on another GPU"
    assert plain._execution_device == META  # the bug: the first component by name wins
    assert pipe._execution_device == torch.device("cpu")
    assert type(pipe).__name__ == "ZImagePipeline" and isinstance(pipe, ZImagePipeline)


def _fp() -> Footprint:
    return Footprint(
        transformer=int(12.3 * GiB),
        text_encoder=int(7.5 * GiB),
        vae=int(0.2 * GiB),
        activations=3 * GiB,
        transformer_block=int(0.4 * GiB),
        text_layer=int(0.2 * GiB),
    )


def _hw(*free_gib: float) -> Hardware:
    gpus = tuple(GPUInfo(i, "GPU", int(f * GiB), int(f * GiB)) for i, f in enumerate(free_gib))
    return Hardware(gpus, 64 * GiB, 64 * GiB)


def test_split_puts_text_encoder_on_one_gpu_transformer_and_vae_on_another():
    plan = choose_mode(_hw(16, 16), _fp())
    assert plan.mode == MemoryMode.MULTI_GPU
    assert plan.placement == {"transformer": "cuda:0", "text_encoder": "cuda:1", "vae": "cuda:0"}
    assert plan.execution_device == "cuda:0"


def test_split_follows_max_memory():
    """Caps decide the split: the GPU left the most room gets the transformer; the VAE moves to
    the text encoder's GPU when the transformer's GPU cannot hold its decode too."""
    hw = cap_per_gpu(_hw(80, 80), {0: int(12 * GiB), 1: int(15.3 * GiB)})
    plan = choose_mode(hw, _fp(), "multi-gpu")
    assert plan.placement["transformer"] == "cuda:1" and plan.placement["text_encoder"] == "cuda:0"
    assert plan.placement["vae"] == "cuda:0"  # 15.3 GiB < transformer + VAE + decode; 12 GiB holds TE + VAE
    roomy = choose_mode(cap_per_gpu(_hw(80, 80), {0: int(12 * GiB)}), _fp(), "multi-gpu")
    assert roomy.placement == {"transformer": "cuda:1", "text_encoder": "cuda:0", "vae": "cuda:1"}


def test_decode_runs_on_the_vaes_device(fresh_engine):
    """The latents go to the VAE's device, wherever the split put it (they come from the transformer's)."""
    vae = fresh_engine.pipe.vae
    vae.to(META)  # stands in for "the VAE is on the text encoder's GPU"
    channels = fresh_engine.pipe.transformer.config.in_channels
    pixels = fresh_engine.runner.decode(torch.randn(1, channels, 16, 16))
    assert pixels.device == META and pixels.dtype == torch.uint8 and pixels.shape[-1] == 3


# --- the decode: the peak of a balanced run ---------------------------------------------------


def test_lean_decoder_decodes_the_same_pixels(engine, tiny_dir):
    """In-place activations in the VAE decoder (applied at load) change no value."""
    from diffusers import AutoencoderKL

    from zimage.model.decode import lean_vae_decoder

    lean = engine.pipe.vae
    plain = AutoencoderKL.from_pretrained(tiny_dir / "vae").eval()
    assert lean_vae_decoder(plain) > 0 and lean_vae_decoder(plain) > 0  # idempotent, and it found them
    plain = AutoencoderKL.from_pretrained(tiny_dir / "vae").eval()  # untouched
    silu = [m for m in lean.decoder.modules() if isinstance(m, torch.nn.SiLU)]
    assert silu and all(m.inplace for m in silu)
    z = torch.randn(2, lean.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lean.decode(z).sample, plain.decode(z).sample)


def test_decode_strategy_from_free_memory():
    from zimage.model.decode import decode_strategy

    one = int(2.6 * GiB)  # a 1024x1024 bfloat16 decode
    assert decode_strategy(4, 1024, 1024, 2, None) == "batch"  # CPU: no limit
    assert decode_strategy(4, 1024, 1024, 2, 5 * one) == "batch"
    assert decode_strategy(4, 1024, 1024, 2, 2 * one) == "slices"  # one image at a time: exact
    assert decode_strategy(1, 1024, 1024, 2, one // 2) == "tiles"  # not even one image: tiles
    assert decode_strategy(1, 1024, 1024, 4, int(1.5 * one)) == "tiles"  # float32 needs twice
    assert decode_strategy(1, 512, 512, 2, one // 2) == "batch"


def test_sliced_decode_is_exact_and_tiles_are_said(engine):
    runner = engine.runner
    channels = engine.pipe.transformer.config.in_channels
    z = torch.randn(3, channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = runner.decode(z, how="batch")
        sliced = runner.decode(z, how="slices")
        notes: list[str] = []
        runner.decode(z, notes, how="tiles")
    # each image decoded alone: the same as in the batch up to the kernels' rounding (as for seeds s+i)
    assert (batch.int() - sliced.int()).abs().max() <= 1
    assert notes and "tiles" in notes[0]
    assert not engine.pipe.vae.use_tiling  # only for that decode


def test_query_chunked_attention_is_the_attention(tiny_dir):
    """The decoder's self-attention taken 256 queries at a time gives what the whole does."""
    from diffusers import AutoencoderKL

    from zimage.model.decode import QueryChunkedAttention, chunk_vae_attention

    plain = AutoencoderKL.from_pretrained(tiny_dir / "vae").eval()
    chunked = AutoencoderKL.from_pretrained(tiny_dir / "vae").eval()
    assert chunk_vae_attention(chunked, max_scores_bytes=1) >= 1  # the smallest blocks: 256 queries
    procs = [m.processor for m in chunked.decoder.modules() if hasattr(m, "processor")]
    assert procs and all(isinstance(p, QueryChunkedAttention) for p in procs)
    z = torch.randn(1, plain.config.latent_channels, 48, 48, generator=torch.Generator().manual_seed(2))  # 2304 queries
    with torch.no_grad():
        a, b = plain.decode(z).sample, chunked.decode(z).sample
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
