"""Refuse, before any work, an llm-foundry run that would load a reparameterized checkpoint without its algorithm.

A checkpoint saved by a run with ``wesar``, ``weight_norm`` or ``sigma_reparam`` holds parameters
a plain model lacks (``...gate``, ``...weight_g``, ``...sn_u``). A run whose ``algorithms`` do
not list the algorithm has nothing of this package installed to object when it loads one, and
torch's ``set_model_state_dict`` (Composer's model load) keeps only the model's own keys, even
with ``load_strict_model_weights: true``: the run would resume from the weights without their
gates, a different model, and say nothing. ``residual_scaling`` adds no keys but moves the
1/sqrt(2N) of W_o and W_d into the forward pass; a plain run that loads its weights computes
another function too.

:func:`check_resume` is an llm-foundry config transform (entry point group
``llmfoundry_config_transforms``, name ``wesar_resume_check``), which llm-foundry's ``train``
applies to the config before it builds anything. It looks at the checkpoint the run will load:

- ``autoresume: true`` with a local ``save_folder`` holding the latest checkpoint (Composer
  loads that one instead of ``load_path``), else ``load_path``;
- a local Composer checkpoint file (``.pt``): the keys of its model state dict and the
  algorithms it records, read with ``mmap`` (no tensor data is read);
- a local sharded checkpoint folder (torch.distributed.checkpoint): the keys in its
  ``.metadata`` file (its recorded algorithms are not read, so ``residual_scaling`` is not
  recognized there).

It raises ``ValueError`` naming the algorithm, the key or record that shows it, and the two ways
on: list the algorithm in ``algorithms``, or load a plain export (``merge_gates`` /
``merge_reparameterization``, or the run's ``hf_checkpointer`` export). Remote paths (``s3://``,
``oci://``, ``gs://``, ...), compressed or archived checkpoints (``.pt.gz``, ``.tar``) and
missing files are not read here (Composer downloads and reports them later). A run that loads
nothing, or that lists every algorithm the check looks for, pays nothing: the function returns
before it reads a file. Runs that list one of these algorithms are checked again once the model
exists (:mod:`wesar_composer.reparam.checkpoints`), whatever their load path.

This module imports only the standard library at import time: llm-foundry loads it on every
train.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

__all__ = ['CHECKED_METHODS', 'check_resume', 'checkpoint_to_load', 'saved_methods']

# The algorithms whose checkpoints a run without them would load wrongly, by registry key, and the
# class name Composer records for each in a checkpoint's ``state.algorithms``.
CHECKED_METHODS = {
    'wesar': 'WeSaR',
    'weight_norm': 'WeightNorm',
    'sigma_reparam': 'SigmaReparam',
    'residual_scaling': 'ResidualScaling',
}
_EXPORT_HINT = {
    'wesar': '`merge_gates(model)`',
    'weight_norm': '`merge_reparameterization(model)`',
    'sigma_reparam': '`merge_reparameterization(model)`',
    'residual_scaling': '`merge_reparameterization(model)`',
}
_MODEL_PREFIX = 'state.model.'
_REMOTE_MARK = '://'
_DEFAULT_LATEST = 'latest-rank{rank}.pt'
_DEFAULT_LATEST_SHARDED = 'latest-sharded-rank{rank}'


def _format(path: str, run_name: Any) -> str:
    """Composer's formatting of a checkpoint path, as rank 0 reads it (``{run_name}``, ``{rank}``, ...)."""
    from composer.utils import partial_format

    return partial_format(path, run_name=run_name, rank=0, local_rank=0, node_rank=0)


def checkpoint_to_load(cfg: Mapping[str, Any]) -> Optional[str]:
    """The checkpoint path a train config will load, formatted as Composer formats it; None if none.

    ``autoresume: true`` with a local ``save_folder`` that holds the latest checkpoint wins over
    ``load_path``, as in Composer's ``Trainer``.
    """
    run_name = cfg.get('run_name') or os.environ.get('RUN_NAME')
    save_folder = cfg.get('save_folder')
    if cfg.get('autoresume') and isinstance(save_folder, str) and _REMOTE_MARK not in save_folder:
        sharded = (cfg.get('fsdp_config') or {}).get('state_dict_type', 'full') == 'sharded'
        latest = cfg.get('save_latest_filename') or (_DEFAULT_LATEST_SHARDED if sharded else _DEFAULT_LATEST)
        path = os.path.join(_format(save_folder, run_name), _format(latest, run_name))
        if os.path.exists(path):
            return path
    load_path = cfg.get('load_path')
    return _format(load_path, run_name) if isinstance(load_path, str) and load_path else None


def saved_methods(path: str) -> Optional[dict[str, str]]:
    """{algorithm: what shows it} for a local checkpoint at ``path``; None if ``path`` is not one this reads.

    A Composer ``.pt`` file: the keys of its model state dict, and the algorithms it records (their
    ``repr``, with the hyperparameters). A sharded checkpoint folder: the model keys of its metadata.
    """
    from wesar_composer.reparam.checkpoints import methods_of_keys

    if _REMOTE_MARK in path or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, '.metadata')):
            return None
        from torch.distributed.checkpoint.filesystem import FileSystemReader

        metadata = FileSystemReader(path).read_metadata()
        keys = [k[len(_MODEL_PREFIX) :] for k in metadata.state_dict_metadata if k.startswith(_MODEL_PREFIX)]
        return {method: f'keys such as {key!r}' for method, key in methods_of_keys(keys).items()}
    import zipfile

    if not zipfile.is_zipfile(path):  # a compressed or archived checkpoint: Composer unpacks it later
        return None
    import torch

    checkpoint = torch.load(path, map_location='cpu', mmap=True, weights_only=False)
    state = checkpoint.get('state', {}) if isinstance(checkpoint, dict) else {}
    found = {method: f'keys such as {key!r}' for method, key in methods_of_keys(state.get('model', {}) or {}).items()}
    by_class = {name: method for method, name in CHECKED_METHODS.items()}
    for entry in state.get('algorithms', None) or []:
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] in by_class:
            method = by_class[entry[0]]
            record = entry[1].get('repr') if isinstance(entry[1], dict) else None
            if method in found or method == 'residual_scaling':
                shown = f'it records {record}' if record else f'it records the {entry[0]} algorithm'
                found[method] = f'{found[method]}; {shown}' if method in found else shown
    return found


def check_resume(cfg: dict[str, Any]) -> dict[str, Any]:
    """llm-foundry config transform: refuse a checkpoint of an algorithm that ``cfg['algorithms']`` does not list.

    Returns ``cfg`` unchanged; raises ``ValueError`` before any work otherwise (see the module's
    docstring for what is read, and what is not).
    """
    listed = set((cfg.get('algorithms') or {}).keys())
    if set(CHECKED_METHODS) <= listed:
        return cfg
    path = checkpoint_to_load(cfg)
    if path is None:
        return cfg
    found = saved_methods(path)
    for method, evidence in (found or {}).items():
        if method in listed:
            continue
        listed_text = ', '.join(sorted(listed)) if listed else 'none'
        raise ValueError(
            f'The checkpoint this run loads ({path}) was saved by a run with the {method} algorithm ({evidence}), '
            f"but this run's `algorithms` do not list {method} (they list: {listed_text}). Composer would load "
            f"its weights without the {method} reparameterization, with no error, and change the model's outputs. "
            f'Add `algorithms: {{{method}: ...}}` with the hyperparameters of the run that saved it, or load a '
            f'plain export instead: the Hugging Face folder its `hf_checkpointer` wrote, or the model after '
            f'{_EXPORT_HINT[method]}.',
        )
    return cfg
