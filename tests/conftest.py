"""Shared fixtures: tiny real MDS data and tiny MPT train configs for the real llm-foundry path.

``tiny_mds`` builds (once per session) a small slice of the offline corpus: ~300 KB of
Shakespeare, a 512-entry byte-level BPE, MDS samples of 64 tokens, train and val splits.
``tiny_train_config`` / ``tiny_train_yaml`` give an llm-foundry train config for a tiny MPT
(d 64, 2 layers, CPU, fp32) on it; add ``algorithms`` / ``callbacks`` / ``loggers`` and run it
with ``llmfoundry.command_utils.train`` or ``train_from_yaml``::

    def test_x(tiny_train_yaml, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        path = tiny_train_yaml(algorithms={'wesar': {}}, max_duration='4ba')
        trainer = train_from_yaml(str(path))
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml

from wesar_composer.tools.data import DatasetPaths, build_dataset

TINY_VOCAB_SIZE = 512
TINY_SEQ_LEN = 64
TINY_MAX_CHARS = 300_000


def _merge(base: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` into a copy of ``base``; a value of None removes the key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_train_config(
    data: DatasetPaths,
    *,
    algorithms: Optional[dict] = None,
    callbacks: Optional[dict] = None,
    loggers: Optional[dict] = None,
    **overrides: Any,
) -> dict:
    """An llm-foundry train config (plain dict) for a tiny MPT on ``data``.

    Rapid recipe of the paper scaled down (Adam betas 0.9/0.95, lr 1e-3 with warmup and cosine
    to 0.1x, clipping 1.0, decoupled weight decay 1e-5 = torch AdamW 0.01 at lr 1e-3), CPU
    settings of DESIGN.md (torch attention, hf RoPE, torch cross entropy, fp32). ``overrides``
    are deep-merged at the top level, e.g. ``model={'n_layers': 4}``, ``max_duration='8ba'``.
    """
    seq = data.seq_len
    loader = {
        'name': 'text',
        'drop_last': True,
        'num_workers': 0,
        'prefetch_factor': None,
        'persistent_workers': False,
    }
    cfg = {
        'run_name': 'tiny',
        'seed': 17,
        'max_seq_len': seq,
        'model': {
            'name': 'mpt_causal_lm',
            'init_device': 'cpu',
            'd_model': 64,
            'n_heads': 4,
            'n_layers': 2,
            'expansion_ratio': 4,
            'max_seq_len': seq,
            'vocab_size': data.vocab_size,
            'no_bias': True,
            'norm_type': 'rmsnorm',
            'norm_eps': 1.0e-5,
            'learned_pos_emb': False,
            'tie_word_embeddings': False,
            'loss_fn': 'torch_crossentropy',
            'attn_config': {'attn_impl': 'torch', 'rope': True, 'rope_impl': 'hf'},
            'ffn_config': {'ffn_type': 'mptmlp', 'ffn_act_fn': {'name': 'gelu'}},
        },
        'tokenizer': {'name': str(data.tokenizer), 'kwargs': {'model_max_length': seq}},
        'train_loader': {
            **loader,
            'dataset': {
                'local': str(data.mds),
                'split': 'train',
                'shuffle': True,
                'shuffle_seed': 17,
                'max_seq_len': seq,
            },
        },
        'eval_loader': {
            **loader,
            'drop_last': False,
            'dataset': {'local': str(data.mds), 'split': 'val', 'shuffle': False, 'max_seq_len': seq},
        },
        'optimizer': {
            'name': 'decoupled_adamw',
            'lr': 1.0e-3,
            'betas': [0.9, 0.95],
            'eps': 1.0e-8,
            'weight_decay': 1.0e-5,
        },
        'scheduler': {'name': 'cosine_with_warmup', 't_warmup': '2ba', 'alpha_f': 0.1},
        'algorithms': {'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0}},
        'max_duration': '4ba',
        'eval_interval': '2ba',
        'eval_subset_num_batches': 2,
        'global_train_batch_size': 8,
        'device_train_microbatch_size': 8,
        'device_eval_batch_size': 8,
        'precision': 'fp32',
        'progress_bar': False,
        'log_to_console': False,
        'python_log_level': None,
        'save_folder': None,
    }
    cfg['algorithms'].update(algorithms or {})
    if callbacks:
        cfg['callbacks'] = copy.deepcopy(callbacks)
    if loggers:
        cfg['loggers'] = copy.deepcopy(loggers)
    return _merge(cfg, overrides)


def write_train_yaml(cfg: dict, path: Path) -> Path:
    """Write ``cfg`` as YAML to ``path`` and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


@pytest.fixture(scope='session')
def tiny_mds(tmp_path_factory: pytest.TempPathFactory) -> DatasetPaths:
    """A small real dataset (~300 KB of text, vocab 512, 64-token samples), built once per session.

    Returns ``DatasetPaths``: ``.tokenizer`` (llm-foundry ``tokenizer.name``), ``.mds``
    (``dataset.local``, splits ``train`` and ``val``), ``.train`` / ``.val`` (split folders),
    ``.vocab_size``, ``.seq_len``.
    """
    root = tmp_path_factory.mktemp('tiny_mds') / 'data'
    return build_dataset(
        root,
        vocab_size=TINY_VOCAB_SIZE,
        seq_len=TINY_SEQ_LEN,
        max_chars=TINY_MAX_CHARS,
        progress=lambda line: None,
    )


@pytest.fixture
def tiny_train_cfg(tiny_mds: DatasetPaths) -> Callable[..., dict]:
    """Factory: ``tiny_train_cfg(algorithms=..., callbacks=..., **overrides) -> dict``."""

    def make(**kwargs: Any) -> dict:
        return tiny_train_config(tiny_mds, **kwargs)

    return make


@pytest.fixture
def tiny_train_yaml(tiny_mds: DatasetPaths, tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_train_yaml(algorithms=..., callbacks=..., **overrides) -> Path`` of a YAML in tmp_path."""
    count = [0]

    def make(**kwargs: Any) -> Path:
        count[0] += 1
        return write_train_yaml(tiny_train_config(tiny_mds, **kwargs), tmp_path / f'tiny-{count[0]}.yaml')

    return make
