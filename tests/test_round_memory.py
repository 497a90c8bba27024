"""Memory of a compiled round does not grow with the clients per round or the largest client.

XLA's memory analysis of the compiled round (`fedjax_llm.round_memory`: its temporary buffers,
everything the program allocates besides its arguments and outputs) is compared across cohorts
of 256 and 10,000 clients of SCAFFOLD, which keeps a per-client state: chunks read their
clients' rows of the store and write them back before the next chunk runs, and each client draws
its batches in O(K * B) (`fedjax_llm.round.random_permutation_at`), so only per-slot scalars
(losses, weights) grow with the cohort. The round sharded over a device mesh writes back chunk
by chunk too. A gathering aggregator (the coordinate median holds every slot's upload) is the
control that shows the measurement can fail.
"""

from __future__ import annotations

import pytest

from fedjax_llm.round_memory import round_temp_bytes


def _temp_bytes(*args, **kwargs) -> int:
    got = round_temp_bytes(*args, **kwargs)
    if got is None:
        pytest.skip("this backend reports no memory analysis")
    return got


@pytest.mark.slow
@pytest.mark.parametrize("devices", [None, 2], ids=["one device", "mesh of 2"])
def test_round_memory_is_flat_in_clients_per_round(devices):
    small, large = _temp_bytes(256, devices=devices), _temp_bytes(10_000, devices=devices)
    assert large <= 1.10 * small, (small, large)
    # The control: every slot's upload held at once grows with the cohort, and is caught.
    assert _temp_bytes(10_000, devices=devices, median=True) > 1.5 * small


def test_round_memory_does_not_grow_with_the_largest_client():
    assert _temp_bytes(256, largest_client=50_000) == _temp_bytes(256)
