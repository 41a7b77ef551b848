"""torch.compile (inductor, on the CPU) trains a gated model to the eager losses; the registry lookup that
Dynamo cannot trace on Python 3.12 is answered from a cache."""

import pytest
import torch

from tests.common import mpt, token_batch, train_losses
from wesar_composer import apply_wesar
from wesar_composer.reparam.compile import make_registry_lookups_compilable


def _losses(compiled: bool, steps: int = 3) -> list[float]:
    model = apply_wesar(mpt(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=32, seed=3), seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # gates included: built after the surgery
    forward = torch.compile(model, backend='inductor') if compiled else model
    batches = (token_batch(seed=i, batch=2, seq=32, vocab=256) for i in range(steps))
    return train_losses(model, optimizer, batches, forward)


@pytest.mark.slow
def test_inductor_gives_the_eager_losses_of_a_gated_mpt():
    make_registry_lookups_compilable()
    eager, compiled = _losses(False), _losses(True)
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_registry_lookup_is_cached_and_still_answers():
    from llmfoundry.layers_registry import ffns_with_megablocks

    ffns_with_megablocks.register('wesar_test_moe', func=lambda **_: None)
    make_registry_lookups_compilable()
    make_registry_lookups_compilable()  # idempotent
    assert 'mptmlp' not in ffns_with_megablocks
    assert 'wesar_test_moe' in ffns_with_megablocks
    cache = ffns_with_megablocks.__dict__['_membership']
    assert cache['mptmlp'] is False and cache['wesar_test_moe'] is True
