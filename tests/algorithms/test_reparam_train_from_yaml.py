"""The compared reparameterizations through llm-foundry's real training path: registry, train_from_yaml, HF export."""

from __future__ import annotations

import math

import pytest
import torch
from composer.loggers import InMemoryLogger
from llmfoundry.command_utils import train_from_yaml
from llmfoundry.utils.builders import build_algorithm

from tests.common.callbacks import FIRST_BATCH_LOSS, first_batch_loss, register_first_batch_loss
from wesar_composer import ResidualScaling, SigmaReparam, WeightNorm
from wesar_composer.algorithms.residual_scaling import ResidualScaledLinear
from wesar_composer.algorithms.sigma_reparam import SigmaReparamEmbedding, SigmaReparamLinear
from wesar_composer.algorithms.weight_norm import WeightNormEmbedding, WeightNormLinear

N_LAYERS = 2  # the tiny train config
METHODS = {
    'weight_norm': ({'sigma_squared': 1.6e-4}, WeightNorm, (WeightNormLinear, WeightNormEmbedding), 2 + 4 * N_LAYERS),
    'sigma_reparam': (
        {'sigma_squared': 6.4e-4},
        SigmaReparam,
        (SigmaReparamLinear, SigmaReparamEmbedding),
        2 + 4 * N_LAYERS,
    ),
    'residual_scaling': ({'backbone': 'he'}, ResidualScaling, (ResidualScaledLinear,), 2 * N_LAYERS),
}


def test_the_algorithms_are_registered_for_yamls():
    for name, (hparams, cls, _, _) in METHODS.items():
        algorithm = build_algorithm(name, dict(hparams))
        assert isinstance(algorithm, cls)
        assert algorithm.required_on_load()
        assert all(f'{k}={v!r}' in repr(algorithm) for k, v in hparams.items())


@pytest.mark.slow
@pytest.mark.parametrize('method', list(METHODS))
def test_train_from_yaml(method, tiny_train_yaml, tmp_path, monkeypatch):
    """A few batches of the tiny MPT on the tiny MDS data, two micro-batches a step, with the monitor."""
    hparams, _, module_types, count = METHODS[method]
    iterations = []
    original = SigmaReparamLinear.power_iteration
    monkeypatch.setattr(SigmaReparamLinear, 'power_iteration', lambda self: (iterations.append(self), original(self)))
    monkeypatch.chdir(tmp_path)
    register_first_batch_loss()
    path = tiny_train_yaml(
        algorithms={method: hparams},
        callbacks={
            'update_ratio_monitor': {'log_interval': 1, 'families': 'all', 'layers': 'all'},
            FIRST_BATCH_LOSS: {},
        },
        loggers={'inmemory': {}},
        max_duration='3ba',
        eval_interval='3ba',
        device_train_microbatch_size=4,
    )
    trainer = train_from_yaml(str(path))
    model = trainer.state.model
    assert sum(isinstance(m, module_types) for m in model.modules()) == count
    assert int(trainer.state.timestamp.batch) == 3
    loss = trainer.state.loss.item()
    assert math.isfinite(loss) and 0 < loss < 7.0  # log(512) = 6.24 at uniform prediction
    seen = first_batch_loss(trainer)  # the same batch under the initial and the trained weights: training lowered it
    assert seen.after < seen.before - 5e-3, (seen.before, seen.after)  # 0.017 to 0.057 here
    logged = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)).data
    assert {'update_ratio/L1/d', 'update_ratio/L1/u', 'update_ratio/L0/q', 'update_ratio/e', 'update_ratio/p'} <= set(
        logged
    )
    ratios = [ratio for _, ratio in logged['update_ratio/L1/d']]
    assert len(ratios) == 3 and all(0 <= r < 1 for r in ratios) and ratios[-1] > 0  # warmup: lr 0 at first
    groups = trainer.state.optimizers[0].param_groups
    if method == 'weight_norm':
        assert len(groups) == 2 and groups[1]['weight_decay'] == 0.0
        assert sum(p.numel() for p in groups[1]['params']) == 2 * 512 + N_LAYERS * (
            3 * 64 + 64 + 256 + 64
        )  # one g per row
    elif method == 'sigma_reparam':
        assert len(groups) == 2 and sum(p.numel() for p in groups[1]['params']) == 2 + 6 * N_LAYERS
        assert {'gate/L0/q', 'gate/L1/d', 'gate/e', 'gate/p'} <= set(logged)
        linear = sum(isinstance(m, SigmaReparamLinear) for m in model.modules())
        assert len(iterations) == 3 * linear  # once per step, not per micro-batch or eval forward
    else:
        assert len(groups) == 1
    trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize('method', ['weight_norm', 'sigma_reparam', 'residual_scaling'])
def test_hf_checkpointer_exports_the_merged_model(method, tiny_train_yaml, tmp_path, monkeypatch):
    """llm-foundry's hf_checkpointer writes a plain MPT (tied head: logit_scale) with the same logits."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    path = tiny_train_yaml(
        algorithms={method: METHODS[method][0]},
        callbacks={
            'hf_checkpointer': {'save_folder': str(tmp_path / 'hf'), 'save_interval': '2ba', 'precision': 'float32'}
        },
        max_duration='2ba',
        eval_interval='2ba',
        model={'tie_word_embeddings': True},
    )
    trainer = train_from_yaml(str(path))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf' / 'huggingface' / 'ba2', trust_remote_code=True)
    keys = set(plain.state_dict())
    assert not any(
        k.rpartition('.')[2] in ('weight_g', 'gate', 'unembed_gate', 'sn_u', 'sn_v', 'sn_sigma') for k in keys
    )
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trainer.state.model.eval().model(tokens).logits
        theirs = plain.eval()(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    trainer.close()
