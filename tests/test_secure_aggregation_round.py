"""Secure aggregation inside the compiled round (`fedjax_llm.secure_aggregation`): the masked
sum equals the clear sum of the same quantized uploads exactly, with lost uploads, on any
chunking and device count, and is the plain mean up to the reported quantization error."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_pipeline import (
    ALGORITHM,
    OBJECTIVE,
    SCHEDULE,
    M,
    cohort,
    compiled_round,
    hparams_for,
    make_problem,
)

from fedjax_llm.pipeline import AggregationPipeline, chain, clip_upload, default_pipeline
from fedjax_llm.round import init_round_state, make_sequential_round
from fedjax_llm.secure_aggregation import secure_masking, secure_mean

IDS = np.asarray([4, 0, 3, 1, 5])
DELIVERED = np.asarray([True, True, False, True, True])  # client 3 masked, then dropped out
CLIP = 2.0


def secure_pipeline(masked: bool, dp: bool = False) -> AggregationPipeline:
    transform = chain(clip_upload(default=CLIP), secure_masking(len(IDS), CLIP, masked=masked))
    aggregator = secure_mean(
        len(IDS), CLIP, expected_clients=5.0 if dp else None, noise_multiplier=0.7, masked=masked
    )
    return AggregationPipeline(transform, aggregator)


def run(pipeline, chunk=2, devices=1, engine="compiled", **kw):
    if engine == "sequential":
        data, params = make_problem()
        fn = make_sequential_round(
            ALGORITHM, OBJECTIVE, SCHEDULE, num_clients_total=M, pipeline=pipeline, **kw
        )
        state = init_round_state(ALGORITHM, params, M, pipeline)
        cohort_ = cohort(IDS, DELIVERED, len(IDS))
        return fn({}, state, data, cohort_, jax.random.key(5), hparams_for(pipeline))
    return compiled_round(pipeline, IDS, DELIVERED, chunk=chunk, devices=devices, key=5, **kw)[0]


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.server.params)]


@pytest.mark.parametrize("dp", [False, True])
def test_the_masked_sum_is_the_clear_quantized_sum_bit_for_bit(dp):
    clear, _ = run(secure_pipeline(masked=False, dp=dp))
    variants = {
        "chunk 2": run(secure_pipeline(True, dp)),
        "chunk 1": run(secure_pipeline(True, dp), chunk=1),
        "2 devices": run(secure_pipeline(True, dp), chunk=1, devices=2),
        "sequential": run(secure_pipeline(True, dp), engine="sequential"),
    }
    for name, (state, out) in variants.items():
        for a, b in zip(leaves(state), leaves(clear), strict=True):
            assert np.array_equal(a, b), name
        assert float(out.pipeline["secagg/summed"]) == 4, name


def test_without_the_dropout_correction_the_masks_would_not_cancel():
    """The control: summing the masked uploads of the delivered clients alone is garbage."""
    broken = secure_pipeline(True)
    aggregator = broken.aggregator

    def finalize(state, acc, key, hparams, context):
        # Pretend every masked client delivered: the lost client's masks are never removed.
        return aggregator.finalize(
            state, acc, key, hparams, context._replace(delivered=context.participating)
        )

    broken = broken._replace(aggregator=aggregator._replace(finalize=finalize))
    state, _ = run(broken)
    clear, _ = run(secure_pipeline(False))
    assert np.abs(leaves(state)[0] - leaves(clear)[0]).max() > 1.0


def test_secure_mean_is_the_plain_uniform_mean_up_to_quantization():
    secure, out = run(secure_pipeline(True))
    plain_pipeline = AggregationPipeline(clip_upload(default=CLIP), default_pipeline().aggregator)
    plain, _ = run(plain_pipeline, uniform_weighting=True)
    error = float(out.pipeline["secagg/quantization_error"])
    assert 0 <= error < 1e-5  # 32-bit ring steps are below float32 resolution here
    for a, b in zip(leaves(secure), leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
