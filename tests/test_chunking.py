"""The automatic chunk size (`fedjax_llm.chunking`)."""

from __future__ import annotations

import math

import pytest

from fedjax_llm.chunking import activation_bytes_per_client, auto_chunk_size


def test_cpu_chunks_reach_the_row_target_of_the_measured_best():
    # tiny (batch 2 x 32 tokens), 256 clients: chunk 32; 3.7M LoRA (4 x 64), 64 clients: 8.
    assert auto_chunk_size(256, 2 * 32, "cpu") == 32
    assert auto_chunk_size(64, 4 * 64, "cpu") == 8
    # The default config (16 clients of 16 x 32 tokens): chunks of 4.
    assert auto_chunk_size(16, 16 * 32, "cpu") == 4


@pytest.mark.parametrize("clients", [1, 3, 10, 16, 37, 100, 1000])
@pytest.mark.parametrize("rows", [1, 64, 512, 4096, 100_000])
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_chunk_is_valid_and_pads_least(clients, rows, platform):
    chunk = auto_chunk_size(clients, rows, platform)
    assert 1 <= chunk <= clients
    chunks = math.ceil(clients / chunk)
    # No fewer chunks would do with this chunk size, and the padding is under one chunk's
    # worth spread over all chunks (less than one slot per chunk).
    assert chunks * chunk - clients < chunks


def test_accelerators_fill_the_device_within_the_memory_cap():
    per_client = activation_bytes_per_client(4, 512, 576, 1536, 30, 9, 49152, 2)
    assert auto_chunk_size(256, 4 * 512, "gpu") > auto_chunk_size(256, 4 * 512, "cpu")
    capped = auto_chunk_size(256, 4 * 512, "gpu", per_client, 8 * per_client)
    assert capped <= 2  # a quarter of 8 clients' worth of memory
    assert auto_chunk_size(256, 4 * 512, "gpu", per_client, 10**15) == 32
