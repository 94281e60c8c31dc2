"""The full-size architecture the GPU benchmark builds: shapes checked on the meta device (no memory),
and the builder itself run on small configs."""

import json

import torch

from zimage.model import tiny
from zimage.model.fullsize import CONFIGS, build, vae_config


def _strip(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def test_full_size_configs_have_the_published_shapes():
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    cfgs = json.loads(CONFIGS.read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config(cfgs))
        transformer = ZImageTransformer2DModel.from_config(_strip(cfgs["transformer/config.json"]))
        text_encoder = Qwen3Model(Qwen3Config(**cfgs["text_encoder/config.json"]))
    sizes = cfgs["sizes_bf16"]
    assert sum(p.numel() for p in transformer.parameters()) == sizes["transformer_params"]
    assert sum(p.numel() for p in text_encoder.parameters()) == sizes["text_encoder_params"]
    assert round(sum(p.numel() for p in vae.parameters()) * 2 / 2**20) == sizes["vae_MiB_on_disk"]
    assert text_encoder.config.hidden_size == transformer.config.cap_feat_dim
    with torch.no_grad():
        image = vae.decode(torch.empty(1, 16, 128, 128, device="meta")).sample
        assert image.shape == (1, 3, 1024, 1024)
        out = transformer(
            [torch.empty(16, 1, 128, 128, device="meta")],
            torch.empty(1, device="meta"),
            [torch.empty(40, 2560, device="meta")],
            return_dict=False,
        )[0]
        assert out[0].shape == (16, 1, 128, 128)


def test_builder_writes_a_loadable_model(tmp_path):
    """The same builder on tiny shapes: sharded files, index, tokenizer; zimage loads and runs it."""
    cfgs = json.loads(CONFIGS.read_text())
    cfgs["transformer/config.json"] = dict(_class_name="ZImageTransformer2DModel", **tiny.TRANSFORMER_CONFIG)
    te = dict(tiny.TEXT_ENCODER_CONFIG, vocab_size=16384, model_type="qwen3")
    cfgs["text_encoder/config.json"] = te
    cfgs["vae/config.json"] = {k: v for k, v in tiny.VAE_CONFIG.items() if not k.endswith("block_types")}
    dest = build(tmp_path / "m", device="cpu", configs=cfgs)
    assert len(list((dest / "transformer").glob("*.safetensors"))) == 2
    assert len(list((dest / "text_encoder").glob("*.safetensors"))) == 3
    assert (dest / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    from zimage.service.engine import Engine
    from zimage.service.request import GenerationRequest
    from zimage.settings import Settings

    eng = Engine(Settings(model=str(dest), device="cpu", warmup=False, min_size=64, outputs_dir=str(tmp_path / "o")))
    eng.load()
    result = eng.generate(GenerationRequest("a harbour at dawn", width=64, height=64, steps=2, seed=1), save=False)
    assert result.images[0].size == (64, 64)
