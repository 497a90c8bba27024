"""The automatic chunk size (``run.clients_per_chunk: auto``).

Clients of a round run in chunks: a `jax.vmap` over a chunk of clients inside a `jax.lax.scan`
over chunks. A chunk must be large enough that each local step's matrix products have enough
rows to run near the device's peak (the rows are chunk x batch x sequence tokens), and no
larger: past that point a larger vmap only adds memory, and on a CPU it spills the caches.
`auto_chunk_size` picks the smallest chunk whose step reaches a per-platform row target,
capped by the clients each device trains and by a share of the device's memory, then evens the
chunks out so that padding is minimal.

The row targets are measured, not guessed (`python scripts/benchmark.py` runs every chunk
size side by side): on CPUs, rounds ran fastest with 2,048 to 4,096 rows per step (tiny model,
batch 2 x 32 tokens: chunk 32; 3.7M-parameter LoRA, batch 4 x 64: chunk 8); on GPUs one
client's step fills a fraction of the device, and the fastest chunk is the largest that fits.
"""

from __future__ import annotations

import math

ROWS_PER_STEP = {"cpu": 2048}
"""Token rows per vmapped local step that a chunk aims for, by platform."""
ACCELERATOR_ROWS_PER_STEP = 65536
"""The same for accelerators (GPU, TPU): fill the device, within the memory cap."""
MEMORY_SHARE = 0.25
"""A chunk's activations may take at most this share of the device's memory."""


def activation_bytes_per_client(
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int,
    dtype_bytes: int = 4,
) -> int:
    """A rough upper estimate of the activations one client's local step keeps for its
    backward pass: per token and layer the attention inputs and outputs, the MLP's three
    projections and the attention weights; plus float32 logits."""
    per_token_layer = 8 * hidden_size + 3 * intermediate_size + num_heads * seq_len
    per_token = num_layers * per_token_layer * dtype_bytes + 2 * vocab_size * 4
    return batch_size * seq_len * per_token


def auto_chunk_size(
    clients_per_device: int,
    rows_per_client: int,
    platform: str,
    bytes_per_client: int | None = None,
    device_bytes: int | None = None,
) -> int:
    """The chunk size for ``run.clients_per_chunk: auto``.

    Args:
      clients_per_device: the most clients one device trains in a round.
      rows_per_client: token rows of one client's local step (batch size x sequence length).
      platform: ``cpu``, ``gpu`` or ``tpu`` (`jax.Device.platform`).
      bytes_per_client: activations of one client's step (`activation_bytes_per_client`), for
        the memory cap; None: no cap.
      device_bytes: the device's memory, for the memory cap.

    Returns:
      A chunk size in ``[1, clients_per_device]``.
    """
    clients_per_device = max(1, clients_per_device)
    target = ROWS_PER_STEP.get(platform, ACCELERATOR_ROWS_PER_STEP)
    chunk = max(1, math.ceil(target / max(1, rows_per_client)))
    if bytes_per_client and device_bytes:
        chunk = min(chunk, max(1, int(MEMORY_SHARE * device_bytes // bytes_per_client)))
    chunk = min(chunk, clients_per_device)
    # As many chunks as that size needs, then evened out: the least padding.
    num_chunks = math.ceil(clients_per_device / chunk)
    return math.ceil(clients_per_device / num_chunks)
