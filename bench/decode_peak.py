"""Where the VAE decode's memory goes (issue 13, item 4): the full-size Z-Image VAE with random
bf16 weights (no model download, no 19 GiB build), one 1024x1024 decode per variant, each in a
fresh CUDA memory count. Variants: the library's decoder; in-place activations (lean); the
query-chunked attention (chunk); both (what zimage loads); and each SDPA kernel forced.

    python3 bench/decode_peak.py [--size 1024] [--out decode_peak.json]      (one GPU, ~1 minute)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 1 << 30


def main() -> int:
    import torch
    from diffusers import AutoencoderKL
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zimage.model.decode import chunk_vae_attention, lean_vae_decoder
    from zimage.model.fullsize import CONFIGS, vae_config

    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--out", default="decode_peak.json")
    a = p.parse_args()
    dev = torch.device("cuda")
    cfg = vae_config(json.loads(CONFIGS.read_text()))
    z = torch.randn(1, 16, a.size // 8, a.size // 8, device=dev, dtype=torch.bfloat16)
    rows = []
    for variant in ("library", "lean", "chunk", "lean+chunk"):
        for backend in ("default", "math", "efficient", "cudnn"):
            torch.manual_seed(0)
            vae = AutoencoderKL.from_config(cfg).to(dev, torch.bfloat16).eval()
            if "lean" in variant:
                lean_vae_decoder(vae)
            if "chunk" in variant:
                chunk_vae_attention(vae)
            kernels = {
                "default": None,
                "math": [SDPBackend.MATH],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION],
                "cudnn": [SDPBackend.CUDNN_ATTENTION],
            }[backend]
            row = {"variant": variant, "sdpa": backend}
            try:
                with torch.no_grad():
                    with sdpa_kernel(kernels) if kernels else _null():
                        vae.decode(z)  # warm: cuDNN plans, allocator
                        torch.cuda.synchronize()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        vae.decode(z)
                        end.record()
                        torch.cuda.synchronize()
                row["decode_gib"] = round((torch.cuda.max_memory_allocated() - base) / GiB, 3)
                row["ms"] = round(start.elapsed_time(end), 1)
            except Exception as exc:  # noqa: BLE001 - a kernel that does not take head size 512 says so
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(row, flush=True)
            rows.append(row)
            del vae
            torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps({"size": a.size, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
