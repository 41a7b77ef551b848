"""The demo YAML: packaged with the tools, written out for editing, read with overrides.

Standard library at import (omegaconf only when a YAML is read), so that
``wesar-demo --write-yaml`` does not import torch, Composer or llm-foundry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Optional, Union

__all__ = ['DEMO_YAML', 'demo_yaml', 'find_demo_yaml', 'load_config', 'write_demo_yaml', 'yaml_label']

DEMO_YAML = 'yamls/demo.yaml'  # package data of wesar_composer.tools


def demo_yaml():
    """The packaged demo YAML: a readable resource (``.open()``, ``.read_text()``), from a wheel or a checkout."""
    return resources.files('wesar_composer.tools').joinpath(DEMO_YAML)


def find_demo_yaml(path: Optional[Union[str, os.PathLike]] = None):
    """``path`` (a file of yours, relative to the current folder), else the packaged demo YAML."""
    if path is None:
        return demo_yaml()
    candidate = Path(path)
    if not candidate.is_file():
        raise FileNotFoundError(
            f'Demo YAML not found: {str(candidate)!r} (from {os.getcwd()}). Leave --yaml out for the packaged one, '
            'or write it out to edit with `wesar-demo --write-yaml demo.yaml`.',
        )
    return candidate


def write_demo_yaml(path: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    """Write the packaged demo YAML to ``path`` (relative to the current folder) for editing.

    An existing file is kept unless ``overwrite``.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f'{str(target)!r} exists; not overwritten (remove it, or pass --force).')
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(demo_yaml().read_text())
    return target


def load_config(yaml_path=None, overrides: Sequence[str] = ()):
    """The YAML (a path, a packaged resource, or None for the packaged demo YAML) with ``overrides``.

    llm-foundry reads relative ``code_paths`` from the current folder; one missing there but
    present beside a YAML file of yours is taken from beside the YAML.
    """
    from omegaconf import OmegaConf as om

    source = demo_yaml() if yaml_path is None else yaml_path
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
    with source.open('r') as f:
        cfg = om.load(f)
    if overrides:
        cfg = om.merge(cfg, om.from_dotlist(list(overrides)))
    if cfg.get('code_paths') and isinstance(source, Path):
        here = source.resolve().parent
        cfg.code_paths = [
            p if Path(p).is_absolute() or Path(p).exists() or not (here / p).is_file() else str(here / p)
            for p in cfg.code_paths
        ]
    return cfg


def yaml_label(yaml_path) -> str:
    """How the report names the YAML: the user's path, or the packaged one."""
    if yaml_path is None or yaml_path == demo_yaml():
        return 'the packaged demo YAML, `wesar-demo --write-yaml demo.yaml`'
    return f'`{yaml_path}`'
