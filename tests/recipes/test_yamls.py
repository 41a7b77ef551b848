"""The paper's YAMLs (yamls/paper/): up to date, valid for llm-foundry, and the numbers of Tables 2, 3, 7, 10, 11."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from composer.core import Event
from composer.optim import DecoupledAdamW
from llmfoundry.command_utils import train_from_yaml
from llmfoundry.command_utils.train import TrainConfig, validate_config
from llmfoundry.utils.builders import build_algorithm, build_callback, build_composer_model
from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, make_dataclass_and_log_config, process_init_device
from omegaconf import OmegaConf as om

from tests.common.recipes import tiny_recipe_overrides
from wesar_composer import PaperInit, WeSaR, ZLoss
from wesar_composer.algorithms.wesar.wesar import GATED_MODULES

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / 'yamls' / 'paper'

# Table 2: d, N, heads, parameters (millions, one decimal)
SIZES = {'130m': (768, 12, 12, 134.1), '1.3b': (2048, 24, 16, 1339.1), '13b': (5120, 40, 40, 12911.0)}
# Tables 3 and 11: tokens per batch, lr, warmup steps
SETTINGS = {'rapid': (2**20, 1e-3, 100), 'stable': (2**22, 5e-4, 2000)}
CORPUS_TOKENS = 30e9
TORCH_ADAMW_WEIGHT_DECAY = 0.01  # Table 11
# The algorithm each method adds at Event.INIT (Tables 5 and 7)
METHODS = {
    'wesar': ('wesar', {'sigma_squared': 4e-5, 'backbone': 'he', 'trainable_gates': True}),
    'small_init': ('paper_init', {'backbone': 'small', 'embedding_scaling': True}),
    'he_init': ('paper_init', {'backbone': 'he', 'embedding_scaling': True}),
    'wesar_small_backbone': ('wesar', {'sigma_squared': 4e-5, 'backbone': 'small', 'trainable_gates': True}),
    'wesar_fixed_gates': ('wesar', {'sigma_squared': 4e-5, 'backbone': 'he', 'trainable_gates': False}),
}
# GPU-only kernels swapped for their CPU equivalents when a test builds a model (same parameters)
CPU_KERNELS = {'attn_impl': 'torch', 'rope_impl': 'hf'}


def load_make_yamls():
    spec = importlib.util.spec_from_file_location('make_yamls', ROOT / 'yamls' / 'make_yamls.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_names():
    """The recipes of Tables 5 and 7 (30B tokens); Table 6's (``*-10b``) are tested in test_reparam_yamls.py."""
    return sorted(name for name in load_make_yamls().recipes() if not name.endswith('-10b'))


def split_name(name):
    method, size, setting = name.split('-')
    return method, size, setting


def validated(path):
    """llm-foundry's own checks, as ``train`` runs them: the TrainConfig dataclass, then validate_config."""
    _, train_cfg = make_dataclass_and_log_config(om.load(path), TrainConfig, TRAIN_CONFIG_KEYS, transforms='all')
    validate_config(train_cfg)
    return train_cfg


def test_generated_yamls_are_up_to_date():
    assert load_make_yamls().stale_files() == []


def test_the_recipes_are_the_papers():
    expected = {f'{m}-{size}-{setting}' for m in ('wesar', 'small_init') for size in SIZES for setting in SETTINGS}
    expected |= {f'{m}-1.3b-rapid' for m in ('he_init', 'wesar_small_backbone', 'wesar_fixed_gates')}
    assert set(recipe_names()) == expected
    assert {p.stem for p in PAPER.glob('*.yaml') if not p.stem.endswith('-10b')} == expected


@pytest.mark.parametrize('name', recipe_names())
def test_yaml_is_valid_and_matches_the_tables(name):
    method, size, setting = split_name(name)
    d, n_layers, heads, _ = SIZES[size]
    tokens_per_batch, lr, warmup = SETTINGS[setting]
    cfg = validated(PAPER / f'{name}.yaml')
    model = cfg.model

    # Table 10
    assert (model['d_model'], model['n_layers'], model['n_heads']) == (d, n_layers, heads)
    assert model['max_seq_len'] == cfg.max_seq_len == 2048
    assert model['vocab_size'] == 32000
    assert model['expansion_ratio'] == 4 and model['ffn_config']['ffn_type'] == 'mptmlp'
    assert model['ffn_config']['ffn_act_fn']['name'] == 'gelu'
    assert model['norm_type'] == 'rmsnorm' and model['norm_eps'] == 1e-5
    assert model['attn_config']['rope'] and not model['learned_pos_emb']
    assert model['no_bias'] and not model['tie_word_embeddings']
    assert model['init_device'] == 'meta'
    # GPU settings
    assert model['attn_config']['attn_impl'] == 'flash' and model['loss_fn'] == 'fused_crossentropy'
    assert cfg.fsdp_config['sharding_strategy'] == 'FULL_SHARD' and cfg.fsdp_config['mixed_precision'] == 'PURE'

    # Tables 3 and 11
    assert cfg.global_train_batch_size * cfg.max_seq_len == tokens_per_batch
    assert cfg.optimizer['name'] == 'decoupled_adamw'
    assert cfg.optimizer['lr'] == lr
    assert tuple(cfg.optimizer['betas']) == (0.9, 0.95)
    assert cfg.optimizer['weight_decay'] == pytest.approx(TORCH_ADAMW_WEIGHT_DECAY * lr, rel=1e-12)
    assert cfg.scheduler == {'name': 'cosine_with_warmup', 't_warmup': f'{warmup}ba', 'alpha_f': 0.1}
    assert cfg.precision == 'amp_bf16'
    batches = int(cfg.max_duration.removesuffix('ba'))
    assert CORPUS_TOKENS <= batches * tokens_per_batch < CORPUS_TOKENS + tokens_per_batch
    assert cfg.algorithms['gradient_clipping'] == {'clipping_type': 'norm', 'clipping_threshold': 1.0}
    assert cfg.algorithms['z_loss'] == {'weight': 1e-4}

    # The method (Tables 5 and 7): exactly one init algorithm with the right hyperparameters
    key, hparams = METHODS[method]
    assert set(cfg.algorithms) == {'gradient_clipping', 'z_loss', key}
    for hparam, value in hparams.items():
        assert cfg.algorithms[key][hparam] == value, hparam

    # Monitoring and logging
    assert cfg.callbacks['update_ratio_monitor']['log_interval'] >= 1
    assert set(cfg.loggers) == {'mlflow'}
    assert cfg.variables['run_name'] == cfg.run_name == name


@pytest.mark.parametrize('name', recipe_names())
def test_algorithms_and_callbacks_build_from_the_registry(name):
    cfg = validated(PAPER / f'{name}.yaml')
    algorithms = {k: build_algorithm(k, copy.deepcopy(v)) for k, v in cfg.algorithms.items()}
    assert isinstance(algorithms['z_loss'], ZLoss) and algorithms['z_loss'].weight == 1e-4
    init = algorithms.get('wesar') or algorithms['paper_init']
    assert isinstance(init, WeSaR if 'wesar' in algorithms else PaperInit)
    for key, kwargs in cfg.callbacks.items():
        build_callback(key, copy.deepcopy(kwargs), train_config={})


def count_on_meta(name):
    """Build the recipe's model on the meta device as ``train`` does, apply its init algorithm at INIT."""
    cfg = validated(PAPER / f'{name}.yaml')
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg['attn_config'].update(CPU_KERNELS)
    model_cfg['loss_fn'] = 'torch_crossentropy'
    init_context = process_init_device(model_cfg, copy.deepcopy(cfg.fsdp_config))
    model = build_composer_model(name=model_cfg.pop('name'), cfg=model_cfg, tokenizer=None, init_context=init_context)
    assert all(p.is_meta for p in model.parameters())
    plain = sum(p.numel() for p in model.parameters())
    for key in ('wesar', 'paper_init'):
        if key in cfg.algorithms:
            state = SimpleNamespace(
                model=model, optimizers=(), callbacks=[], device=None, rank_zero_seed=0, fsdp_config=None
            )
            build_algorithm(key, copy.deepcopy(cfg.algorithms[key])).apply(Event.INIT, state, None)
    gates = sum(p.numel() for n, p in model.named_parameters() if n.rpartition('.')[2] in ('gate', 'unembed_gate'))
    total = sum(p.numel() for p in model.parameters())
    return model, plain, total - gates, gates


@pytest.mark.parametrize('name', recipe_names())
def test_parameter_count_matches_table_2(name):
    """Table 2 counts embeddings and head untied, and the RMSNorm weights; gates aside (+1 per matrix)."""
    method, size, _ = split_name(name)
    d, n_layers, _, millions = SIZES[size]
    model, plain, without_gates, gates = count_on_meta(name)
    vocab = 32000
    assert plain == 2 * vocab * d + n_layers * (12 * d * d + 2 * d) + d  # e, p; qkv o u d; norms
    assert abs(plain / 1e6 - millions) <= 0.05, plain
    assert without_gates == plain
    if method.startswith('wesar'):
        # one gate per matrix, q k v of the fused Wqkv each their own: e, p and 6 per block
        assert gates == 2 + 6 * n_layers
        assert sum(isinstance(m, GATED_MODULES) for m in model.modules()) == 2 + 4 * n_layers
    else:
        assert gates == 0


@pytest.mark.parametrize('lr', [1e-3, 5e-4])
def test_decoupled_weight_decay_equals_torch_adamw_0_01(lr):
    """Composer's decay is weight_decay * lr_t / lr; torch AdamW's is 0.01 * lr_t: equal at weight_decay = 0.01 lr.

    With zero gradients Adam's step is zero, so only the decay moves the weights; the lr follows
    a warmup-and-decay schedule to show that the two agree at every lr_t, not only at the peak.
    """
    recipe = validated(PAPER / f'wesar-130m-{"rapid" if lr == 1e-3 else "stable"}.yaml')
    assert recipe.optimizer['lr'] == lr
    torch.manual_seed(0)
    start = torch.randn(1000, dtype=torch.float64)
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    decoupled = DecoupledAdamW([ours], lr=lr, betas=(0.9, 0.95), weight_decay=recipe.optimizer['weight_decay'])
    adamw = torch.optim.AdamW([theirs], lr=lr, betas=(0.9, 0.95), weight_decay=TORCH_ADAMW_WEIGHT_DECAY)
    for factor in [0.1, 0.5, 1.0, 1.0, 0.7, 0.3, 0.1] * 50:
        for optimizer, param in ((decoupled, ours), (adamw, theirs)):
            optimizer.param_groups[0]['lr'] = lr * factor
            param.grad = torch.zeros_like(param)
            optimizer.step()
    assert not torch.equal(ours.detach(), start)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=0)


# Scaled down to run on a CPU: a tiny model on the tiny corpus; everything else as in the recipe
# (algorithms, callbacks, MLflow logger, optimizer, schedule shape).
def tiny_overrides(data, tracking_dir):
    return tiny_recipe_overrides(
        data,
        f'variables.mlflow_tracking_uri=file://{tracking_dir}',
        'console_log_interval=1ba',
        microbatch=4,
        max_duration='4ba',
        eval_interval='4ba',
    )


@pytest.mark.slow
@pytest.mark.parametrize('name', ['wesar-130m-rapid', 'small_init-1.3b-stable'])
def test_recipe_trains_through_llmfoundry(name, tiny_mds, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    trainer = train_from_yaml(str(PAPER / f'{name}.yaml'), tiny_overrides(tiny_mds, tmp_path / 'mlruns'))
    losses = trainer.state.total_loss_dict
    assert losses['loss/train/total'] == pytest.approx(losses['loss/train/loss'] + losses['loss/train/z_loss'])
    assert 0 < losses['loss/train/z_loss'] < 1e-4 * 2 * math.log(tiny_mds.vocab_size) ** 2
    assert {type(a).__name__ for a in trainer.state.algorithms} == {
        'GradientClipping',
        'ZLoss',
        'WeSaR' if name.startswith('wesar') else 'PaperInit',
    }
    assert trainer.state.timestamp.batch.value == 4
    trainer.close()

    runs = mlflow.search_runs(experiment_names=['wesar-paper'], output_format='list')
    assert len(runs) == 1
    logged = set(runs[0].data.metrics)
    assert {'loss/train/z_loss', 'loss/train/total', 'update_ratio/L1/d', 'update_ratio/L1/u'} <= logged
