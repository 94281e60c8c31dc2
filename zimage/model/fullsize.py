"""The full-size Z-Image-Turbo architecture with random bf16 weights, for GPU benchmarks.

Same configs, shapes, file layout and shard sizes as the published model (configs in
zimage/model/configs/z-image-turbo-configs.json), so loading and compute cost the same; only the pictures
are meaningless. The tokenizer is a byte-level BPE trained here on English text from
Python's own sources, with Qwen's special tokens and chat template, so a 20-word prompt
becomes a few dozen tokens as with the real one (ids stay inside Qwen3's vocabulary).
"""

from __future__ import annotations

import json
import logging
import os
import sysconfig
import time
from pathlib import Path

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs" / "z-image-turbo-configs.json"
SHARDS = {"transformer": 2, "text_encoder": 3, "vae": 1}
FILE_STEM = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def _corpus(limit_bytes: int = 24 << 20):
    """English prose from the standard library's docstrings and comments."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        total += len(text)
        yield text
        if total > limit_bytes:
            break


def build_tokenizer(dest: Path, vocab_size: int = 16384) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from zimage.model.tiny import SPECIAL_TOKENS, name_as_qwen2, qwen_style

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tok = qwen_style(core, model_max_length=131072)
    tok.save_pretrained(dest)
    name_as_qwen2(dest)


def _random_state(module, device) -> dict:
    """Random bf16 tensors for every parameter: norms 1, biases 0, weights N(0, 0.02)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, p in module.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        elif len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)
            t = t.to(torch.bfloat16)
        out[name] = t
    return out


def _save_sharded(state: dict, folder: Path, stem: str, shards: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    per = total / shards
    groups: list[list[str]] = [[]]
    acc = 0
    for n in names:
        size = state[n].numel() * state[n].element_size()
        if acc + size > per * len(groups) and groups[-1] and len(groups) < shards:
            groups.append([])
        groups[-1].append(n)
        acc += size
    if len(groups) == 1:
        save_file({n: state[n].cpu() for n in groups[0]}, folder / f"{stem}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n].cpu() for n in group}, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def vae_config(cfgs: dict) -> dict:
    """The published VAE config names only what differs from diffusers' defaults; the block lists it
    leaves out are one entry per resolution level (Flux's VAE: four down and four up blocks)."""
    cfg = {k: v for k, v in cfgs["vae/config.json"].items() if not k.startswith("_")}
    levels = len(cfg["block_out_channels"])
    cfg.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
    cfg.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    return cfg


def build(dest: str | Path, device: str = "cuda", configs: dict | None = None) -> Path:
    """Write the full-size random model to dest (skipped when it is already complete)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    dest = Path(dest)
    marker = dest / "zimage_fullsize.json"
    if marker.is_file():
        return dest
    cfgs = configs or json.loads(CONFIGS.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def strip(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    with init_empty_weights():
        transformer = ZImageTransformer2DModel.from_config(strip(cfgs["transformer/config.json"]))
        vae = AutoencoderKL.from_config(vae_config(cfgs))
        te_cfg = Qwen3Config(**cfgs["text_encoder/config.json"])
        text_encoder = Qwen3Model(te_cfg)
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder)):
        state = _random_state(module, device)
        _save_sharded(state, dest / name, FILE_STEM[name], SHARDS[name])
        del state
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        log.info("wrote %s (%.0fs)", name, time.perf_counter() - t0)
    transformer.save_config(dest / "transformer")
    vae.save_config(dest / "vae")
    te_cfg.save_pretrained(dest / "text_encoder")
    FlowMatchEulerDiscreteScheduler.from_config(strip(cfgs["scheduler/scheduler_config.json"])).save_pretrained(
        dest / "scheduler"
    )
    build_tokenizer(dest / "tokenizer")
    index = dict(cfgs["model_index.json"])
    index["_diffusers_version"] = __import__("diffusers").__version__
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))
    marker.write_text(json.dumps({"built_s": round(time.perf_counter() - t0, 1)}))
    os.sync()
    return dest
