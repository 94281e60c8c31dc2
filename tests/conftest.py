"""Shared fixtures: one tiny model per test session, engines built on it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .support import ROOT

sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from zimage.model.tiny import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def make_settings(tiny_dir, tmp_path_factory):
    from zimage.settings import Settings

    def make(**kw):
        base = dict(
            model="tiny",
            tiny_dir=str(tiny_dir),
            outputs_dir=str(tmp_path_factory.mktemp("outputs")),
            min_size=64,
            warmup=False,
            device="cpu",
            compile_cache_dir=str(tmp_path_factory.mktemp("inductor")),
        )
        base.update(kw)
        return Settings(**base)

    return make


@pytest.fixture(scope="session")
def engine(make_settings):
    """A loaded tiny engine shared by tests that only generate."""
    from zimage.service.engine import Engine

    eng = Engine(make_settings())
    eng.load()
    yield eng
    eng.shutdown(grace_s=5)
