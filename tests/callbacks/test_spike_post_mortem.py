"""The spike post-mortem: a learning-rate jump on two matrices provokes a loss spike, and
LossSpikeCounter names exactly the matrices whose update ratio jumped, in the run's log, in a
table through Composer's logger (an MLflow artifact) and in wesar-plot's picture."""

import logging
import statistics

import pytest
import torch
from composer.core import Callback
from composer.loggers import InMemoryLogger, MLFlowLogger
from torch.utils.data import DataLoader

from tests.common import cpu_trainer, mpt
from tests.common.callbacks import UpdateRatioRecorder
from wesar_composer import LossSpikeCounter, UpdateRatioMonitor
from wesar_composer.callbacks.loss_spike_counter import POST_MORTEM_COLUMNS
from wesar_composer.callbacks.post_mortem import post_mortem_text
from wesar_composer.roles import find_matrices
from wesar_composer.tools.plotting import load_runs
from wesar_composer.tools.plotting import main as plot_main

VOCAB, N_LAYERS, JUMP, BOOST, HISTORY = 64, 3, 30, 100.0, 8


class Progressions(torch.utils.data.Dataset):
    """Arithmetic progressions mod VOCAB: learnable in a few dozen steps, so a jump shows as a spike."""

    def __init__(self, n=512, seq=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.tokens = (start + step * torch.arange(seq)) % VOCAB

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        t = self.tokens[i]
        return {'input_ids': t, 'labels': t.clone(), 'attention_mask': torch.ones_like(t)}


class LrJump(Callback):
    """Multiplies the learning rate of the second param group by BOOST from 0-based batch JUMP on."""

    def batch_start(self, state, logger):
        if state.timestamp.batch.value == JUMP:
            state.optimizers[0].param_groups[1]['lr'] *= BOOST


def provoke_spike(boosted_layer, monitor, loggers):
    """A tiny MPT on progressions; the lr of W_o and W_d of ``boosted_layer`` jumps BOOST-fold at JUMP."""
    model = mpt(d_model=64, n_layers=N_LAYERS, vocab_size=VOCAB)
    boosted = [
        s.module.weight for s in find_matrices(model) if s.layer == boosted_layer and s.roles in (('o',), ('d',))
    ]
    rest = [p for p in model.parameters() if all(p is not b for b in boosted)]
    optimizer = torch.optim.AdamW([{'params': rest}, {'params': boosted}], lr=1e-2, betas=(0.9, 0.95), weight_decay=0)
    counter = LossSpikeCounter(window_size=10, min_history=10)
    recorder = UpdateRatioRecorder(model)
    memory = InMemoryLogger()
    trainer = cpu_trainer(
        model,
        dataloader=DataLoader(Progressions(), batch_size=8),
        optimizer=optimizer,
        max_duration=f'{JUMP + 4}ba',
        callbacks=[counter, monitor, LrJump(), recorder],  # the counter first: it must not see the spike's own step
        loggers=[memory, *loggers],
    )
    trainer.fit()
    trainer.close()
    return counter, recorder, memory


def expected_rise(ratios_by_step: dict[int, dict[str, float]], spike_batch: int, history: int):
    """The post-mortem computed independently: the last step before the spike over the median of the kept earlier ones."""
    steps = sorted(s for s in ratios_by_step if s < spike_batch)[-history:]
    last, earlier = steps[-1], steps[:-1]
    rise = {}
    for key, ratio in ratios_by_step[last].items():
        rise[key] = ratio / statistics.median(ratios_by_step[s][key] for s in earlier)
    return last, earlier, sorted(rise, key=rise.get, reverse=True), rise


@pytest.fixture(scope='module')
def full_view_run(tmp_path_factory):
    store = tmp_path_factory.mktemp('spike') / 'mlruns'
    mlflow = MLFlowLogger(
        experiment_name='spike', run_name='lr-jump', tracking_uri=str(store), log_system_metrics=False
    )
    monitor = UpdateRatioMonitor(log_interval=1, families=['update_ratio'], layers='all', history=HISTORY)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    counter_log = logging.getLogger('wesar_composer.callbacks.loss_spike_counter')
    counter_log.addHandler(handler)
    try:
        counter, recorder, memory = provoke_spike(N_LAYERS - 1, monitor, [mlflow])
    finally:
        counter_log.removeHandler(handler)
    return counter, recorder, memory, store, [r.getMessage() for r in records]


@pytest.mark.slow
def test_the_spike_names_the_matrices_whose_logged_ratio_jumped(full_view_run):
    counter, _, memory, _, messages = full_view_run
    losses = [v for _, v in memory.data['loss/train/total']]
    assert counter.count >= 1
    report = counter.post_mortems[0]
    spike = report['batch']
    assert spike > JUMP + 1  # after the jump: the loss of batch JUMP + 2 is the first computed with the boosted step
    assert losses[spike - 1] >= 1.5 * statistics.fmean(losses[spike - 11 : spike - 1])
    # expected ranking from the logged metrics alone
    logged = {}
    for key, values in memory.data.items():
        suffix = key.removeprefix('update_ratio/')
        if key.startswith('update_ratio/') and (suffix.startswith('L') or suffix in ('e', 'p')):
            for timestamp, value in values:
                logged.setdefault(timestamp.batch.value, {})[suffix] = value
    last, earlier, ranking, rise = expected_rise(logged, spike, HISTORY)
    assert (report['step'], report['baseline_steps']) == (last, earlier)
    assert [row[0] for row in report['rows']] == ranking
    assert [row[1] for row in report['rows']] == pytest.approx([rise[k] for k in ranking], rel=1e-9)
    # the two boosted matrices lead, far ahead of every other one
    top = N_LAYERS - 1
    assert set(ranking[:2]) == {f'L{top}/o', f'L{top}/d'}
    assert min(rise[k] for k in ranking[:2]) > 10 * max(rise[k] for k in ranking[2:])
    # the log line and the table
    line = next(m for m in messages if m.startswith(f'batch {spike}: loss spike 1'))
    assert (
        f'Update ratios at step {last} against the median of steps {earlier[0]}-{earlier[-1]}: rose most {ranking[0]} x'
        in line
    )
    risen = [k for k in ranking if rise[k] > 1][:5]  # only matrices whose ratio rose are named as risen
    named = line.split(' rose most ')[1].split('. Largest')[0]
    assert [part.split(' x')[0] for part in named.split(', ')] == risen
    assert 'Largest update ratios: ' in line
    import json

    table = json.loads(memory.tables['loss_spike/update_ratio_rise_1'])
    assert table['columns'] == POST_MORTEM_COLUMNS
    assert [row[3] for row in table['data']] == ranking and [row[2] for row in table['data']] == list(
        range(1, len(ranking) + 1)
    )


@pytest.mark.slow
def test_the_table_reaches_mlflow_and_wesar_plot_draws_it(full_view_run, tmp_path, capsys):
    counter, _, _, store, _ = full_view_run
    (run,) = load_runs(str(store), ['lr-jump'])
    spikes = run.spikes()
    assert [s['batch'] for s in spikes] == [p['batch'] for p in counter.post_mortems]
    first = counter.post_mortems[0]
    assert [r[0] for r in spikes[0]['rows']] == [r[0] for r in first['rows']]
    assert [r[1] for r in spikes[0]['rows']] == pytest.approx([r[1] for r in first['rows']], rel=1e-9)
    assert plot_main(['--tracking-uri', str(store), '--out', str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert 'spike_post_mortem.png' in out.out
    assert 'param_norm_L2.png left out' in out.err  # families: [update_ratio] only
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(tmp_path / 'spike_post_mortem.png').shape
    assert height > 200 and width > 500


@pytest.mark.slow  # a 34-batch run
def test_matrices_not_logged_as_metrics_are_still_named():
    """Default layers [0, -1]: the middle layer has no metrics, but its jump is named, with the ratios of the step."""
    monitor = UpdateRatioMonitor(log_interval=1, history=HISTORY)  # defaults otherwise
    counter, recorder, memory = provoke_spike(1, monitor, [])
    assert 'update_ratio/L1/o' not in memory.data and 'update_ratio/L0/o' in memory.data
    report = counter.post_mortems[0]
    last, earlier, ranking, rise = expected_rise(recorder.ratios, report['batch'], HISTORY)
    assert set(ranking[:2]) == {'L1/o', 'L1/d'}
    assert [row[0] for row in report['rows']][:2] == ranking[:2]
    by_key = {row[0]: row for row in report['rows']}
    for key in by_key:
        assert by_key[key][1] == pytest.approx(rise[key], rel=1e-4), key  # by hand from the weights
        assert by_key[key][2] == pytest.approx(recorder.ratios[last][key], rel=1e-4), key


def test_no_monitor_no_post_mortem_and_the_log_says_so():
    text, rise = post_mortem_text(None, 5, names=5)
    assert 'Add update_ratio_monitor' in text and rise is None


@pytest.mark.parametrize('bad', [-1, 1.5, True, '3'])
def test_bad_name_matrices_names_the_value(bad):
    with pytest.raises(ValueError, match=f'name_matrices must be an integer >= 0.*got {bad!r}'):
        LossSpikeCounter(name_matrices=bad)


@pytest.mark.parametrize('bad', [1, 0, 2.5, True, None])
def test_bad_history_names_the_value(bad):
    with pytest.raises(ValueError, match=f'history must be an integer >= 2.*got {bad!r}'):
        UpdateRatioMonitor(history=bad)


def test_history_is_bounded():
    monitor = UpdateRatioMonitor(log_interval=1, history=3)
    for step in range(10):
        monitor._history.append((step, [float(step)]))
    assert [s for s, _ in monitor._history] == [7, 8, 9]
