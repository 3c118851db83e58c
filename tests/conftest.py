"""Shared fixtures: an isolated model cache, the tiny model and its (real) tokenizer.

Tests run offline on CPU. TUNELAB_HOME defaults to a folder in the checkout so that repeated runs
reuse the built cache; CI starts with it empty.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TUNELAB_HOME", str(Path(__file__).resolve().parents[1] / ".tunelab-test-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tunelab.models import ensure_alias

    return ensure_alias("tiny-test")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from tunelab.models import load_tokenizer

    return load_tokenizer("tiny-test")


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh tiny model (seeded weights) per test: tests may train it."""
    from tunelab.models import load_model

    return load_model("tiny-test", dtype="float32", device="cpu")
