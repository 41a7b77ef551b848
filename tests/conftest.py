"""Shared fixtures: tiny real MDS data and tiny MPT train configs for the real llm-foundry path.

The plain builders behind them are in ``tests/common/train_config.py``.

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

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.common.train_config import (
    TINY_MAX_CHARS,
    TINY_SEQ_LEN,
    TINY_VOCAB_SIZE,
    tiny_train_config,
    write_train_yaml,
)
from wesar_composer.tools.data import DatasetPaths, build_dataset


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


def _one_process_per_core_under_xdist() -> None:
    """Under ``pytest -n 2`` (two workers on two cores): one torch thread per worker, and the
    in-process streaming datasets of worker gwK take shared-memory numbers from 100000 x (K + 1)
    (``tests/common/streaming_names.py``)."""
    worker = os.environ.get('PYTEST_XDIST_WORKER')
    if not worker:
        return
    import torch

    from tests.common.streaming_names import count_names_from

    torch.set_num_threads(1)
    count_names_from(100_000 * (1 + int(worker.removeprefix('gw'))))


_one_process_per_core_under_xdist()
