"""The demo end to end on the tiny dataset: two llm-foundry runs, MLflow, report, pictures."""

from __future__ import annotations

import math
import re

import pytest
from omegaconf import OmegaConf as om

from wesar_composer.tools import console, demo, report


def test_demo_yaml_is_the_rapid_recipe_scaled_down():
    cfg = om.load(demo.find_demo_yaml())
    # CPU: no memory pinning (torch warns on every loader) and no system-metrics thread beside the run
    assert cfg.train_loader.pin_memory is False and cfg.eval_loader.pin_memory is False
    assert cfg.loggers.mlflow.log_system_metrics is False
    for method, expected in (('small_init', 'paper_init'), ('wesar', 'wesar')):
        resolved = om.to_container(om.merge(cfg, {'variables': {'method': method}}), resolve=True)
        algorithms = resolved['algorithms']
        assert set(algorithms) == {'gradient_clipping', 'z_loss', expected}
        assert algorithms['z_loss']['weight'] == 1e-4
        assert algorithms['gradient_clipping'] == {'clipping_type': 'norm', 'clipping_threshold': 1.0}
        assert resolved['run_name'] == f'demo-{method}'
        assert resolved['seed'] == 17 and resolved['train_loader']['dataset']['shuffle_seed'] == 17
        opt = resolved['optimizer']
        assert (opt['lr'], opt['betas'], opt['weight_decay']) == (1e-3, [0.9, 0.95], 1e-5)
        assert resolved['model']['attn_config']['attn_impl'] == 'torch'
        assert resolved['model']['loss_fn'] == 'torch_crossentropy'
        assert resolved['precision'] == 'fp32'
        assert 'update_ratio_monitor' in resolved['callbacks'] and 'loss_spike_counter' in resolved['callbacks']
        assert 'mlflow' in resolved['loggers']
    assert om.to_container(cfg, resolve=True)['algorithms']['wesar']['backbone'] == 'he'
    small = om.to_container(om.merge(cfg, {'variables': {'method': 'small_init'}}), resolve=True)
    assert small['algorithms']['paper_init'] == {'backbone': 'small', 'embedding_scaling': True}


@pytest.fixture
def console_bound_transformers_logging():
    """transformers' log handler as in a real process: bound to the console's stderr, its once-only warnings unseen."""
    import logging
    import sys

    handlers = [h for h in logging.getLogger('transformers').handlers if type(h) is logging.StreamHandler]
    assert handlers
    saved = [h.setStream(sys.__stderr__) for h in handlers]
    logging.Logger.warning_once.cache_clear()  # the GenerationMixin warning is logged once per process
    yield
    for handler, stream in zip(handlers, saved):
        handler.setStream(stream)


@pytest.mark.slow
def test_demo_runs_both_methods_and_reports(tiny_mds, tmp_path, capfd, console_bound_transformers_logging):
    out = tmp_path / 'demo'
    n_layers = 2
    report, results = demo.run_demo(
        out,
        demo.find_demo_yaml(),
        overrides=[
            f'variables.vocab_size={tiny_mds.vocab_size}',
            f'variables.max_seq_len={tiny_mds.seq_len}',
            'model.d_model=64',
            f'model.n_layers={n_layers}',
            'global_train_batch_size=8',
            'device_train_microbatch_size=8',
            'max_duration=6ba',
            'eval_interval=3ba',
            'eval_subset_num_batches=2',
            'callbacks.update_ratio_monitor.log_interval=2',
        ],
        data_dir=str(tiny_mds.root),
        max_chars=tiny_mds.manifest['settings']['max_chars'],
    )
    captured = capfd.readouterr()
    printed = captured.out
    shown = captured.out + captured.err
    for noise in ('GenerationMixin', 'Unrecognized keys in `rope_scaling`', 'it/s]'):  # nothing of llm-foundry's leaks
        assert noise not in shown, noise
    assert [line for line in shown.splitlines() if line.strip() and not line.startswith('[wesar-demo] ')] == []
    assert [r.method for r in results] == ['small_init', 'wesar']
    for r in results:
        assert r.batches == 6 and r.tokens == 6 * 8 * tiny_mds.seq_len
        assert math.isfinite(r.val_loss) and r.val_perplexity == pytest.approx(math.exp(r.val_loss))
        assert r.spikes == 0  # the counter ran: 6 batches, fewer than its min_history of 10, can hold no spike
        assert r.wall_seconds > 0 and r.run_id
        assert f'[wesar-demo] {r.method}: batch 6/6' in printed
        assert re.search(rf'\[wesar-demo\] {r.method}: batch 6/6 loss \S+ lr \S+ spikes 0 \(', printed), printed
        assert (out / f'{r.method}.log').read_text().strip()  # llm-foundry's output went to the log
    # Small init: W_d starts sqrt(2N) times smaller than W_u while Adam moves both alike, so
    # its d/u update-ratio gap is about sqrt(2N) = 2; WeSaR gives every W the same std: about 1.
    small, wesar = results
    assert small.d_over_u == pytest.approx(math.sqrt(2 * n_layers), rel=0.3)
    assert wesar.d_over_u == pytest.approx(1.0, rel=0.3)
    text = report.read_text()
    assert '| Small init (baseline) |' in text and '| WeSaR |' in text
    # evaluation was limited to 2 batches of 64 sequences: the report says so, not "the whole split"
    val_tokens = tiny_mds.manifest['stats']['val']['mds_tokens']
    assert 'whole validation split' not in text
    assert (
        f'on the first 2 batches of 64 validation sequences, {min(2 * 64 * tiny_mds.seq_len, val_tokens):,} '
        f"of the split's {val_tokens:,} tokens (eval_subset_num_batches: 2)"
    ) in text
    assert f'{small.val_loss:.3f}' in text and f'{wesar.val_perplexity:.1f}' in text
    pictures = sorted(p.name for p in out.glob('*.png'))
    assert pictures == ['param_norm_L1.png', 'update_ratio_L1.png', 'update_ratio_heatmap.png']
    for name in pictures:
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert f']({name})' in text
    from mlflow.tracking import MlflowClient

    client = MlflowClient(str(out / 'mlruns'))
    runs = {r.info.run_name: r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert set(runs) == {'demo-small_init', 'demo-wesar'}
    assert all(r.info.status == 'FINISHED' for r in runs.values())
    assert runs['demo-wesar'].data.metrics['loss_spike/count'] == results[1].spikes


def test_report_says_whole_split_when_evaluation_is_not_limited():
    assert (
        report.evaluated_text({'val_tokens': 124032, 'eval_tokens': 124032, 'eval_batches': -1, 'eval_batch_size': 64})
        == 'the whole validation split (124,032 tokens)'
    )


def test_known_noise_is_dropped_by_logger_and_message_only():
    import logging

    console.quiet_known_noise()
    console.quiet_known_noise()  # once per process, however often called
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append((record.name, record.getMessage()))
    message = {
        name: f'X has generative capabilities ... {fragment} ...' for name, fragment in console.KNOWN_NOISE.items()
    }
    for name in console.KNOWN_NOISE:
        logger = logging.getLogger(name)
        assert sum(isinstance(f, console.DropMessage) for f in logger.filters) == 1
        logger.addHandler(handler)
        try:
            logger.warning(message[name])
            logger.warning('Some other warning')
        finally:
            logger.removeHandler(handler)
    other = logging.getLogger('transformers.generation.utils')
    other.addHandler(handler)
    try:
        other.warning(message['transformers.modeling_utils'])
    finally:
        other.removeHandler(handler)
    assert seen == [(name, 'Some other warning') for name in console.KNOWN_NOISE] + [
        ('transformers.generation.utils', message['transformers.modeling_utils'])
    ]


def test_demo_reports_a_missing_yaml(tmp_path, capsys):
    assert demo.main(['--yaml', str(tmp_path / 'nope.yaml'), '--out', str(tmp_path / 'o')]) == 2
    assert 'Demo YAML not found' in capsys.readouterr().err


def test_write_yaml_imports_no_torch_and_names_the_two_process_launch(tmp_path):
    """``wesar-demo --write-yaml`` and ``--help`` import the light modules only (no torch, Composer, llm-foundry)."""
    import subprocess
    import sys

    code = (
        'import sys; from wesar_composer.tools import demo; '
        f"assert demo.main(['--write-yaml', {str(tmp_path / 'demo.yaml')!r}]) == 0; "
        "heavy = sorted(m for m in ('torch', 'composer', 'llmfoundry', 'omegaconf') if m in sys.modules); "
        'print(heavy)'
    )
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == '[]', done.stdout + done.stderr
    assert 'OMP_NUM_THREADS=1 composer -n 2 -m llmfoundry.cli.cli train' in done.stdout
    assert (tmp_path / 'demo.yaml').read_text() == demo.demo_yaml().read_text()
