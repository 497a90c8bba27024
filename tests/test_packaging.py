"""Packaging: our top-level ``kernels`` package must not break `transformers`, which probes for
a Hugging Face package of the same name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kernels

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def test_kernels_is_ours():
    assert os.path.abspath(kernels.__file__).startswith(ROOT)
    assert hasattr(kernels, "weighted_mean")


def test_transformers_tokenizers_import_beside_our_kernels():
    pytest.importorskip("transformers")
    code = (
        "import kernels, fedjax_llm\n"
        "from transformers import AutoTokenizer, PreTrainedTokenizerFast, LlamaConfig\n"
        "print(kernels.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(ROOT)
