"""The tiny test model: the real Z-Image classes with tiny random weights.

It is written once, in the diffusers layout (model_index.json, one folder per component,
bf16 safetensors like the real release), so that the next start only loads it and every
loading path is the one the real model takes. Its pictures are noise; it exists so that
tests, CI and the offline demo run the real code on a CPU in well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat template reduced to what the pipeline uses: one user turn, a generation
# prompt, and the empty think block that enable_thinking=False adds.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

TRANSFORMER_CONFIG = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=16,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 4, 4],
    axes_lens=[1024, 256, 256],
)
TEXT_ENCODER_CONFIG = dict(
    vocab_size=320,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=1024,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=256,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
    force_upcast=True,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies use.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer():
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template, built offline."""
    from tokenizers import Tokenizer, models

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    # A few merges so that common text is shorter than one token per byte.
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("e", "r"), ("o", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok = qwen_style(core, model_max_length=4096)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tok


def qwen_style(core, model_max_length: int):
    """Wrap a byte-level BPE `tokenizers.Tokenizer` with Qwen's special tokens and chat template."""
    from tokenizers import decoders, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=model_max_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def name_as_qwen2(tokenizer_dir: Path) -> None:
    """The real release names Qwen2Tokenizer; say the same so AutoTokenizer takes the same class."""
    cfg_path = Path(tokenizer_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def build_components(seed: int = 0):
    """The five pipeline components with deterministic random weights (float32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
    # diffusers zero-initialises the pad tokens; random ones make the test model exercise them.
    with torch.no_grad():
        transformer.x_pad_token.normal_(std=0.5)
        transformer.cap_pad_token.normal_(std=0.5)
    tokenizer = build_tokenizer()
    te_config = Qwen3Config(**TEXT_ENCODER_CONFIG)
    te_config.architectures = ["Qwen3ForCausalLM"]
    text_encoder = Qwen3Model(te_config)
    vae = AutoencoderKL(**VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return dict(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, scheduler=scheduler)


def write_model(dest: Path, seed: int = 0) -> Path:
    """Write the tiny model to dest (atomically: a temp folder renamed into place)."""
    import torch
    from diffusers import ZImagePipeline

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    comps = build_components(seed)
    for name in ("transformer", "text_encoder", "vae"):
        comps[name].to(torch.bfloat16)
    pipe = ZImagePipeline(**comps)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dest.parent))
    try:
        # Small shards, so the sharded-checkpoint path (index json) is exercised like the real model's.
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size="100KB")
        name_as_qwen2(tmp / "tokenizer")
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
        index_path.write_text(json.dumps(index, indent=2))
        (tmp / "zimage_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": seed}))
        try:
            os.rename(tmp, dest)
        except OSError:
            if _is_complete(dest):  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _is_complete(dest: Path) -> bool:
    marker = dest / "zimage_tiny.json"
    try:
        return json.loads(marker.read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny(dest: str | Path) -> Path:
    """The tiny model folder, built on first use."""
    dest = Path(dest).expanduser()
    if not _is_complete(dest):
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        write_model(dest)
    return dest
