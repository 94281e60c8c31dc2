"""Finding the model (tiny, folder, hub cache) and the fast loader's fidelity."""

import shutil

import pytest
import torch

from zimage.errors import ModelNotFound
from zimage.model.loading import LoadOptions, footprint, load_components, resolve_model
from zimage.settings import Settings


def test_missing_hub_model_says_where_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFound) as info:
        resolve_model(Settings(model="Tongyi-MAI/Z-Image-Turbo"))
    msg = str(info.value)
    assert "Tongyi-MAI/Z-Image-Turbo" in msg
    assert str(tmp_path / "hf" / "hub") in msg  # where it looked
    assert "ZIMAGE_MODEL" in msg and "--model tiny" in msg  # what to do
    assert "HF_HUB_OFFLINE" in msg


def test_missing_folder_and_non_model_folder(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(Settings(model=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no model_index.json"):
        resolve_model(Settings(model=str(tmp_path / "empty")))


def _hub_snapshot(
    tiny_dir, hf_home, repo="Tongyi-MAI/Z-Image-Turbo", commit="0123456789abcdef0123456789abcdef01234567"
):
    """Lay the tiny model out exactly as huggingface_hub caches a download."""
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(tiny_dir, snap)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def test_hub_snapshot_loads_through_the_real_path(tiny_dir, tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE, the default repo id resolves to the cached snapshot and loads."""
    hf_home = tmp_path / "hf"
    snap = _hub_snapshot(tiny_dir, hf_home)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hf_home / "hub"))
    from zimage.service.engine import Engine
    from zimage.service.request import GenerationRequest

    s = Settings(
        model="Tongyi-MAI/Z-Image-Turbo", device="cpu", warmup=False, min_size=64, outputs_dir=str(tmp_path / "o")
    )
    source = resolve_model(s)
    assert source.kind == "hub" and source.path == snap
    eng = Engine(s)
    eng.load()
    assert eng.source.kind == "hub"
    result = eng.generate(GenerationRequest("hub model", width=64, height=64, steps=2, seed=3), save=False)
    assert result.images[0].size == (64, 64) and result.model == "Tongyi-MAI/Z-Image-Turbo"


def test_local_folder_preset(tiny_dir):
    source = resolve_model(Settings(model=str(tiny_dir)))
    assert source.kind == "local"


def _state(module):
    return {k: v.detach().float() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("mmap,threads,staging_mb", [(False, 4, 1), (False, 1, 64), (True, 2, 1)])
def test_fast_loader_gives_from_pretrained_weights(tiny_dir, mmap, threads, staging_mb):
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Model

    source = resolve_model(Settings(model=str(tiny_dir)))
    place = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")
    # staging of 1 MiB cuts tensors across chunk boundaries: the scatter logic is exercised
    opts = LoadOptions(dtype=torch.float32, threads=threads, staging_mb=staging_mb, mmap=mmap, trim=False)
    fast = load_components(source, place, opts)
    refs = {
        "transformer": ZImageTransformer2DModel.from_pretrained(tiny_dir / "transformer", dtype=torch.float32),
        "text_encoder": Qwen3Model.from_pretrained(tiny_dir / "text_encoder", dtype=torch.float32),
        "vae": AutoencoderKL.from_pretrained(tiny_dir / "vae", dtype=torch.float32),
    }
    for name, ref in refs.items():
        a, b = _state(fast[name]), _state(ref)
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_trimmed_text_encoder_gives_hidden_states_minus_two(tiny_dir):
    from transformers import Qwen3Model

    source = resolve_model(Settings(model=str(tiny_dir)))
    place = dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu")
    trimmed = load_components(source, place, LoadOptions(dtype=torch.float32, trim=True))["text_encoder"]
    full = Qwen3Model.from_pretrained(tiny_dir / "text_encoder", dtype=torch.float32).eval()
    ids = torch.randint(0, 260, (1, 17))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[-2]
        got = trimmed(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert torch.equal(want, got)
    assert len(trimmed.layers) == len(full.layers) - 1


def test_footprint_from_headers(tiny_dir):
    source = resolve_model(Settings(model=str(tiny_dir)))
    fp = footprint(source, trim_text_encoder=False)
    fp_trim = footprint(source, trim_text_encoder=True)
    assert fp.transformer > 0 and fp.vae > 0 and fp_trim.text_encoder < fp.text_encoder
    assert fp.transformer_block > 0 and fp.text_layer > 0


def test_tiny_model_is_built_once(tiny_dir):
    from zimage.model.tiny import ensure_tiny

    marker = tiny_dir / "zimage_tiny.json"
    before = marker.stat().st_mtime_ns
    ensure_tiny(tiny_dir)
    assert marker.stat().st_mtime_ns == before
