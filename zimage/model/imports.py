"""Import only what runs: the three model classes, the tokenizer and the scheduler, each from its
own module, never from a package root that imports every model the library has.

diffusers' root and `diffusers.models` are lazy, but two subpackages on our path are not:
`diffusers.models.transformers/__init__.py` imports all ~75 transformer models and
`diffusers.models.autoencoders/__init__.py` all ~40 autoencoders, just to import the one we use.
`lazy_subpackages()` puts a lazy stand-in for each such package in `sys.modules` before it is
first imported: the same module (same `__path__`, `__spec__`, `__file__`), whose names resolve on
first use from the `from .module import Name` lines of its own `__init__.py`. Nothing changes for
code that asks for any name later; it only stops paying for the names nobody asks for. When an
`__init__.py` holds anything but such imports (a newer diffusers may), it is imported as usual.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import sys
import time
import types
from typing import Any

log = logging.getLogger(__name__)

# Packages whose __init__ imports every sibling module eagerly.
EAGER_PACKAGES = ("diffusers.models.transformers", "diffusers.models.autoencoders")

# class name in model_index.json -> the module that defines it (checked by the tests)
MODULES = {
    ("diffusers", "ZImageTransformer2DModel"): "diffusers.models.transformers.transformer_z_image",
    ("diffusers", "AutoencoderKL"): "diffusers.models.autoencoders.autoencoder_kl",
    ("diffusers", "FlowMatchEulerDiscreteScheduler"): "diffusers.schedulers.scheduling_flow_match_euler_discrete",
    ("diffusers", "ZImagePipeline"): "diffusers.pipelines.z_image.pipeline_z_image",
    ("transformers", "Qwen3Model"): "transformers.models.qwen3.modeling_qwen3",
    ("transformers", "Qwen2Tokenizer"): "transformers.models.qwen2.tokenization_qwen2",
}


class LazyPackage(types.ModuleType):
    """A package whose names import their own module on first use."""

    _zimage_names: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        sub = self.__dict__.get("_zimage_names", {}).get(name)
        if sub is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{sub}"), name)
        setattr(self, name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.__dict__.get("_zimage_names", {})))


def _names(tree: ast.Module) -> dict[str, str] | None:
    """name -> submodule from `from .sub import Name` lines; None when the file does anything else."""
    out: dict[str, str] = {}

    def walk(body: list[ast.stmt]) -> bool:
        for node in body:
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                if any(a.name == "*" for a in node.names) or "." in node.module:
                    return False
                for alias in node.names:
                    out[alias.asname or alias.name] = node.module
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                continue  # absolute or parent imports (`from ...utils import is_torch_available`)
            elif isinstance(node, ast.If):
                if not (walk(node.body) and walk(node.orelse)):
                    return False
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            else:
                return False
        return True

    return out if walk(tree.body) and out else None


def lazy_package(name: str) -> bool:
    """Put a lazy stand-in for package `name` in sys.modules; False when it cannot (left as is)."""
    if name in sys.modules:
        return isinstance(sys.modules[name], LazyPackage)
    try:
        spec = importlib.util.find_spec(name)  # imports the parents, not the package itself
        if spec is None or spec.origin is None or not spec.submodule_search_locations:
            return False
        with open(spec.origin, encoding="utf-8") as f:
            names = _names(ast.parse(f.read()))
    except (ImportError, OSError, SyntaxError, ValueError):
        return False
    if names is None or name in sys.modules:
        return False
    module = importlib.util.module_from_spec(spec)
    module.__class__ = LazyPackage
    module._zimage_names = names
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        try:
            setattr(sys.modules[parent], child, module)
        except AttributeError:
            pass
    return True


def lazy_subpackages() -> list[str]:
    """Install the stand-ins that apply; returns the packages made lazy."""
    return [name for name in EAGER_PACKAGES if lazy_package(name)]


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
    """Import what the pipeline runs on (lazy stand-ins first); (seconds, diffusers version)."""
    t0 = time.perf_counter()
    lazy = lazy_subpackages()
    for library, class_name in MODULES:
        import_class(library, class_name)
    import diffusers

    log.debug("lazy packages: %s", ", ".join(lazy) or "none")
    return time.perf_counter() - t0, diffusers.__version__
