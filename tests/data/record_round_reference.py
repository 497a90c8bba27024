"""Re-records ``round_reference.npz`` with the current engine (run from the repository root:
``python tests/data/record_round_reference.py``).

Only for a deliberate change of what a default round computes; say why in the commit. The
data (tokens, loss masks, client sizes) are kept from the existing fixture.
"""

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
from conftest import tiny_config  # noqa: E402
from test_round_reference import (  # noqa: E402
    CASES,
    REFERENCE,
    SIMULATIONS,
    compute_case,
    compute_simulation,
)

out = {key: REFERENCE[key] for key in ("tokens", "loss_mask", "sizes")}
for name in CASES:
    out.update(compute_case(name))
for name, sections in SIMULATIONS.items():
    out.update(compute_simulation(name, tiny_config(tempfile.mkdtemp(), **sections)))
np.savez_compressed(os.path.join(HERE, "round_reference.npz"), **out)
print(sorted(out))
