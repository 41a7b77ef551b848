"""Table 6 recipes (yamls/paper/*-1.3b-rapid-10b.yaml): the paper's numbers, parameter counts, a scaled-down train."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from composer.core import Event
from llmfoundry.command_utils import train_from_yaml
from llmfoundry.command_utils.train import TrainConfig, validate_config
from llmfoundry.utils.builders import build_algorithm, build_composer_model
from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, make_dataclass_and_log_config, process_init_device
from omegaconf import OmegaConf as om

from tests.common.callbacks import FIRST_BATCH_LOSS, first_batch_loss, register_first_batch_loss
from tests.common.recipes import tiny_recipe_overrides

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / 'yamls' / 'paper'
TOKENS_PER_BATCH = 512 * 2048  # rapid (Table 3)
TABLE6_TOKENS = 10e9
D, N, VOCAB = 2048, 24, 32000  # 1.3B (Table 2)
PLAIN_PARAMS = 1_339_131_904
# Table 6: the algorithm each row adds, its hyperparameters, and its "# Param." column (millions)
TABLE6 = {
    'small_init': ('paper_init', {'backbone': 'small', 'embedding_scaling': True}, 1339.1),
    'weight_norm': ('weight_norm', {'sigma_squared': 16e-5, 'embedding_scaling': True}, 1339.6),
    'sigma_reparam': ('sigma_reparam', {'sigma_squared': 64e-5, 'embedding_scaling': True}, 1339.1),
    'residual_scaling_he': ('residual_scaling', {'backbone': 'he', 'embedding_scaling': True}, 1339.1),
    'residual_scaling_small': ('residual_scaling', {'backbone': 'small', 'embedding_scaling': True}, 1339.1),
    'wesar': ('wesar', {'sigma_squared': 4e-5, 'backbone': 'he', 'trainable_gates': True}, 1339.1),
}
CPU_KERNELS = {'attn_impl': 'torch', 'rope_impl': 'hf'}


def table6_names():
    spec = importlib.util.spec_from_file_location('make_yamls', ROOT / 'yamls' / 'make_yamls.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sorted(name for name in module.recipes() if name.endswith('-10b'))


def validated(name):
    _, cfg = make_dataclass_and_log_config(
        om.load(PAPER / f'{name}.yaml'), TrainConfig, TRAIN_CONFIG_KEYS, transforms='all'
    )
    validate_config(cfg)
    return cfg


def test_table6_has_one_recipe_per_row():
    assert table6_names() == sorted(f'{m}-1.3b-rapid-10b' for m in TABLE6)
    assert {p.stem for p in PAPER.glob('*-10b.yaml')} == set(table6_names())


@pytest.mark.parametrize('name', table6_names())
def test_recipe_is_the_rapid_1_3b_recipe_on_10b_tokens(name):
    method = name.split('-')[0]
    cfg = validated(name)
    reference = validated('small_init-1.3b-rapid' if method == 'small_init' else 'wesar-1.3b-rapid')
    batches = int(cfg.max_duration.removesuffix('ba'))
    assert TABLE6_TOKENS <= batches * TOKENS_PER_BATCH < TABLE6_TOKENS + TOKENS_PER_BATCH
    assert cfg.global_train_batch_size * cfg.max_seq_len == TOKENS_PER_BATCH
    # everything but the duration, the run name and the method is the 30B-token rapid 1.3B recipe
    for key in ('model', 'optimizer', 'scheduler', 'fsdp_config', 'callbacks', 'precision', 'train_loader'):
        assert getattr(cfg, key) == getattr(reference, key), key
    key, hparams, _ = TABLE6[method]
    assert set(cfg.algorithms) == {'gradient_clipping', 'z_loss', key}
    for hparam, value in hparams.items():
        assert cfg.algorithms[key][hparam] == value, hparam
    build_algorithm(key, copy.deepcopy(cfg.algorithms[key]))
    assert cfg.run_name == name


@pytest.mark.parametrize('name', table6_names())
def test_parameter_count_matches_table_6(name):
    """Built on meta as `train` does, the method applied at INIT: Table 6's "# Param." column."""
    method = name.split('-')[0]
    cfg = validated(name)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg['attn_config'].update(CPU_KERNELS)
    model_cfg['loss_fn'] = 'torch_crossentropy'
    init_context = process_init_device(model_cfg, copy.deepcopy(cfg.fsdp_config))
    model = build_composer_model(name=model_cfg.pop('name'), cfg=model_cfg, tokenizer=None, init_context=init_context)
    assert sum(p.numel() for p in model.parameters()) == PLAIN_PARAMS
    key, _, millions = TABLE6[method]
    state = SimpleNamespace(model=model, optimizers=(), callbacks=[], device=None, rank_zero_seed=0, fsdp_config=None)
    build_algorithm(key, copy.deepcopy(cfg.algorithms[key])).apply(Event.INIT, state, None)
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    extra = {
        'weight_norm': 2 * VOCAB + N * (3 * D + D + 4 * D + D),  # one g per row of every matrix
        'sigma_reparam': 2 + 6 * N,  # one a per matrix, q k v each their own
        'wesar': 2 + 6 * N,
    }.get(method, 0)
    assert total == PLAIN_PARAMS + extra
    assert round(total / 1e6, 1) == millions


@pytest.mark.slow
def test_sigma_reparam_recipe_trains_through_llmfoundry(tiny_mds, tmp_path, monkeypatch):
    """The recipe scaled down to the tiny model and data; everything else as written."""
    monkeypatch.chdir(tmp_path)
    register_first_batch_loss()
    overrides = tiny_recipe_overrides(
        tiny_mds,
        'loggers={}',
        f'callbacks.{FIRST_BATCH_LOSS}={{}}',
        microbatch=8,
        max_duration='3ba',
        eval_interval='2ba',
    )
    trainer = train_from_yaml(str(PAPER / 'sigma_reparam-1.3b-rapid-10b.yaml'), overrides)
    assert {type(a).__name__ for a in trainer.state.algorithms} == {'GradientClipping', 'ZLoss', 'SigmaReparam'}
    assert trainer.state.timestamp.batch.value == 3
    assert 0 < trainer.state.total_loss_dict['loss/train/loss'] < 7.0
    seen = first_batch_loss(trainer)  # the same batch under the initial and the trained weights: training lowered it
    assert seen.after < seen.before - 5e-3, (
        seen.before,
        seen.after,
    )  # 0.06 here; 2 batches left the weights as they were
    trainer.close()
