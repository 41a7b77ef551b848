"""The tiny llm-foundry train config: an MPT of width 64 and 2 layers on CPU, fp32, on a tiny MDS dataset.

``tiny_train_config(data, algorithms=..., callbacks=..., loggers=..., **overrides)`` returns a plain
dict for ``llmfoundry.command_utils.train``; ``write_train_yaml`` writes it for ``train_from_yaml``
or a ``composer -n 2`` launch. The pytest fixtures that build the data and call these live in
``tests/conftest.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import yaml

from wesar_composer.tools.data import DatasetPaths

__all__ = ['TINY_MAX_CHARS', 'TINY_SEQ_LEN', 'TINY_VOCAB_SIZE', 'tiny_train_config', 'write_train_yaml']

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
    settings (torch attention, hf RoPE, torch cross entropy, fp32). ``overrides``
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
