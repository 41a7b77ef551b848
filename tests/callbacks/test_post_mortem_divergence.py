"""The post-mortem on spikes provoked from a YAML alone, read as a user reads the run's log.

1. WeSaR on the demo recipe's shape (d 128, 4 layers, 10 warmup batches) at lr 5e-2, 50 times the
   recipe's: the loss diverges during warmup. The guard reports it from the batch where it
   starts, the counter one batch later, both say "during warmup", no matrix is said to have
   "risen" whose update ratio fell, and the absolute update ratios (near 1) are in the line.
2. WeSaR at lr 3e-2 on the tiny recipe: a spike the run recovers from.
3. The line reaches the console on a line of its own, with time and level, under a progress bar.
"""

from __future__ import annotations

import logging
import re
import statistics
import subprocess
import sys
import textwrap

import pytest
from llmfoundry.command_utils import train_from_yaml

from wesar_composer import LossSpikeCounter, SpikeGuard, UpdateRatioMonitor

LOGGERS = ('wesar_composer.callbacks.spike_guard', 'wesar_composer.callbacks.loss_spike_counter')
NAMED = re.compile(r'(\S+) x([0-9.e+-]+|inf) \(([0-9.e+-]+)\)')


def _run(tiny_train_yaml, tmp_path, monkeypatch, caplog, **overrides):
    monkeypatch.chdir(tmp_path)
    path = tiny_train_yaml(
        algorithms={'wesar': {}},
        callbacks={
            'update_ratio_monitor': {'log_interval': 1},
            'loss_spike_counter': {},
            'spike_guard': {'action': 'log'},
        },
        loggers={'inmemory': {}},
        **overrides,
    )
    with caplog.at_level(logging.WARNING):
        trainer = train_from_yaml(str(path))
    memory = next(d for d in trainer.logger.destinations if hasattr(d, 'most_recent_values'))
    losses = [v for _, v in memory.data['loss/train/total']]
    lines = [r.getMessage() for r in caplog.records if r.name in LOGGERS]
    callbacks = {type(c): c for c in trainer.state.callbacks}
    return losses, lines, callbacks


def _check_rises(line: str, rows) -> None:
    """Every matrix named as risen rose; a line saying none rose is right; absolute ratios are given.

    ``rows``: the ranking behind the line, ``(key, rise, ratio, baseline)``; None when the first steps
    at lr 0 left fewer than two steps that moved weights.
    """
    if rows is None:
        assert 'fewer than two logged steps that moved weights' in line
        return
    by_key = {key: value for key, value, _, _ in rows}
    if ' rose most ' in line:
        named = NAMED.findall(line.split(' rose most ')[1].split('. Largest')[0])
        assert named
        for key, value, _ in named:
            assert float(value) > 1 and by_key[key] > 1, (key, value)
    else:
        assert ' none rose ' in line and max(by_key.values()) <= 1
    largest = max(ratio for _, _, ratio, _ in rows)
    assert 'Largest update ratios: ' in line
    assert ('near 1 means the step replaced the weights' in line) == (largest >= 0.1)


def _rows(monitor: UpdateRatioMonitor, line: str):
    rise = monitor.ratio_rise(before_batch=int(line.split(':')[0].removeprefix('batch ')))
    return None if rise is None else rise.rows


@pytest.mark.slow  # two short runs through llm-foundry's train
def test_divergence_at_lr_5e_2_is_reported_where_it_starts_during_warmup(
    tiny_train_yaml, tmp_path, monkeypatch, caplog
):
    losses, lines, callbacks = _run(
        tiny_train_yaml,
        tmp_path,
        monkeypatch,
        caplog,
        model={'d_model': 128, 'n_layers': 4},
        optimizer={'lr': 5.0e-2},
        scheduler={'t_warmup': '10ba'},
        max_duration='9ba',
        eval_interval='9ba',
    )
    guard, counter, monitor = callbacks[SpikeGuard], callbacks[LossSpikeCounter], callbacks[UpdateRatioMonitor]
    # where it starts, from the losses alone: the first one 10% above the median of those before it
    start = next(i for i in range(3, len(losses)) if losses[i] > 1.1 * statistics.median(losses[:i]))
    assert losses[-1] > 3 * losses[start - 1]  # it diverged
    first_batch = start + 1  # the callbacks count batches after the step, as the monitor's steps
    guard_lines = [line for line in lines if 'outlier' in line]
    assert guard_lines[0].startswith(f'batch {first_batch}: outlier during warmup (learning rate ')
    assert guard.outliers == len(losses) - start
    counter_lines = [line for line in lines if 'loss spike 1' in line]
    assert counter_lines[0].startswith(f'batch {first_batch + 1}: loss spike 1 during warmup')
    assert counter.count == 1 and 'the loss did not come back (a divergence)' in lines[-1]
    for line in guard_lines + counter_lines[:1]:
        _check_rises(line, _rows(monitor, line))
    assert any(' none rose ' in line for line in guard_lines)  # the ratios fell while the loss went up


@pytest.mark.slow
def test_a_spike_the_run_recovers_from(tiny_train_yaml, tmp_path, monkeypatch, caplog):
    losses, lines, callbacks = _run(
        tiny_train_yaml,
        tmp_path,
        monkeypatch,
        caplog,
        optimizer={'lr': 3.0e-2},
        max_duration='64ba',
        eval_interval='64ba',
    )
    counter = callbacks[LossSpikeCounter]
    assert counter.count >= 1 and not counter.in_spike  # the loss came back
    assert losses[-1] < 1.2 * min(losses[:4])
    assert not any('did not come back' in line for line in lines)
    first = next(line for line in lines if 'loss spike 1' in line)
    assert counter.post_mortems[0]['batch'] == int(first.split(':')[0].removeprefix('batch '))
    _check_rises(first, counter.post_mortems[0]['rows'])


CONSOLE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import torch
    from composer import Trainer
    from composer.core import Callback
    from torch.utils.data import DataLoader
    from tests.common import TokenBatches, mpt
    from wesar_composer import SpikeGuard

    class BlowUp(Callback):
        def after_loss(self, state, logger):
            if state.timestamp.batch.value == 5:
                state.loss = state.loss * 100

    model = mpt(d_model=32, n_heads=2, n_layers=1)
    Trainer(
        model=model,
        train_dataloader=DataLoader(TokenBatches(n=64), batch_size=4),
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
        max_duration='8ba',
        callbacks=[SpikeGuard()],
        device='cpu',
        progress_bar=True,
    ).fit()
    """
)


def test_the_line_has_its_own_console_line_with_time_and_level_under_a_progress_bar(tmp_path):
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / 'console.py'
    script.write_text(
        CONSOLE_SCRIPT.format(root=root).replace('callbacks=[SpikeGuard()]', 'callbacks=[SpikeGuard(), BlowUp()]')
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert 'train' in output and 'ba' in output  # the progress bar was drawn
    screen = render(output)
    pattern = re.compile(r'^\d{4}-\d\d-\d\d [\d:,]+: WARNING: wesar_composer\.callbacks\.spike_guard: batch 6: outlier')
    assert any(pattern.match(row) for row in screen), [row for row in screen if 'batch 6' in row]


def render(text: str) -> list[str]:
    """The rows a terminal shows for ``text``: carriage returns, newlines and tqdm's cursor-up code."""
    rows: dict[int, list[str]] = {}
    row = col = 0
    for token in re.findall(r'\x1b\[A|.|\n', text, flags=re.S):
        if token == '\x1b[A':
            row = max(0, row - 1)
        elif token == '\r':
            col = 0
        elif token == '\n':
            row, col = row + 1, 0
        else:
            cells = rows.setdefault(row, [])
            cells.extend(' ' * (col + 1 - len(cells)))
            cells[col] = token
            col += 1
    return [''.join(rows.get(i, [])).rstrip() for i in range(max(rows, default=-1) + 1)]
