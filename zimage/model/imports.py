"""Import only what runs: the three model classes, the tokenizer and the scheduler, each from its
own module (the class names in model_index.json and tokenizer_config.json map to them here).

Measured on the H200 box (bench/results, `bench imports`): importing these from their own
modules took as long as asking the package roots (10.2 s against 9.6 s, side by side), because
the roots are lazy and the cost is elsewhere: torch._dynamo (4.6 s, pulled in by
diffusers.utils), the libraries' package checks (2.0 s) and diffusers' single-file loader
(2.4 s: scipy.stats, transformers' auto classes, torchvision), which ZImagePipeline's base
classes import. A lazy stand-in for diffusers' two eager subpackages (all transformer models,
all autoencoders) was tried and dropped: it saved nothing measurable.

Also tried and not kept (branch `imports`, 2026-11-30): deferring torch._dynamo (and scipy.stats)
until the compile imports it. Dynamo is reached in six ways on the way to the first image
(diffusers' and transformers' marking decorators, `torch.compiler.disable` on pipeline and hook
methods, torch's own meta-init path, an isinstance check, transformers' masking module), so the
deferral needed a process-wide import hook and stand-ins for `disable`: about 550 lines. It took
`import_libraries()` from 3.13 to 2.40 s of CPU on the 2-core CPU box (5 fresh processes each,
medians); sympy still comes in through transformers' DTensor import. 0.7 s against a 22 s gap to
the restart target did not pay for a hook on every import of a weeks-long process.
"""

from __future__ import annotations

import importlib
import logging
import time

log = logging.getLogger(__name__)

# class name in model_index.json -> the module that defines it (checked by the tests)
MODULES = {
    ("diffusers", "ZImageTransformer2DModel"): "diffusers.models.transformers.transformer_z_image",
    ("diffusers", "AutoencoderKL"): "diffusers.models.autoencoders.autoencoder_kl",
    ("diffusers", "FlowMatchEulerDiscreteScheduler"): "diffusers.schedulers.scheduling_flow_match_euler_discrete",
    ("diffusers", "ZImagePipeline"): "diffusers.pipelines.z_image.pipeline_z_image",
    ("transformers", "Qwen3Model"): "transformers.models.qwen3.modeling_qwen3",
    ("transformers", "Qwen2Tokenizer"): "transformers.models.qwen2.tokenization_qwen2",
}


def import_class(library: str, class_name: str):
    """The class a model_index.json entry names, imported from its own module when known."""
    module = MODULES.get((library, class_name))
    if module is not None:
        try:
            return getattr(importlib.import_module(module), class_name)
        except (ImportError, AttributeError):
            log.debug("%s not in %s; asking the %s root", class_name, module, library)
    return getattr(importlib.import_module(library), class_name)


def import_libraries() -> tuple[float, str]:
    """Import what the pipeline runs on; (seconds, diffusers version)."""
    t0 = time.perf_counter()
    for library, class_name in MODULES:
        import_class(library, class_name)
    import diffusers

    return time.perf_counter() - t0, diffusers.__version__
