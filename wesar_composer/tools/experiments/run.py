"""Running the grid of ``wesar-experiments``: one run through llm-foundry, and the pool of worker processes."""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Optional, cast

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from wesar_composer.callbacks.keys import LOSS_KEY
from wesar_composer.tools.experiments.grid import (
    METHODS,
    MLFLOW_EXPERIMENT,
    RECORDER_CALLBACK,
    TAG,
    RunSpec,
    Scale,
    _say,
    build_config,
    plan,
    run_settings,
)
from wesar_composer.tools.experiments.tables import RESULTS_CSV, Row, _append_row, read_results

__all__ = ['LossRecorder', 'diverged', 'max_attention_logit', 'run_one', 'run_grid']


class LossRecorder(Callback):
    """Keeps the training loss and the time of every batch; writes them as JSON at the end of training,
    with the largest attention logit of the trained model on the last training batch."""

    def __init__(self, path: str):
        self.path = path
        self.losses: list[float] = []
        self.batch_seconds: list[float] = []
        self._t: Optional[float] = None

    def batch_start(self, state: State, logger: Logger) -> None:
        self._t = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._t is not None:
            self.batch_seconds.append(time.perf_counter() - self._t)
        loss = state.total_loss_dict.get(LOSS_KEY)
        self.losses.append(float(loss) if loss is not None else float('nan'))

    def fit_end(self, state: State, logger: Logger) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        logit = max_attention_logit(state.model, state.batch)
        Path(self.path).write_text(
            json.dumps(
                {
                    'loss': [None if not math.isfinite(x) else x for x in self.losses],
                    'batch_s': self.batch_seconds,
                    'max_attn_logit': logit if math.isfinite(logit) else None,
                }
            )
        )


@torch.no_grad()
def max_attention_logit(model: torch.nn.Module, batch) -> float:
    """Largest q . k * softmax_scale over heads and causal positions of every attention layer, on ``batch``.

    Wraps each llm-foundry attention module's ``attn_fn`` for one forward pass in eval mode; it
    sees q and k after qk-LayerNorm and RoPE. NaN if the model has no such module.
    """
    found: list[float] = []
    wrapped = []
    for module in model.modules():
        fn = getattr(module, 'attn_fn', None)
        if not callable(fn):
            continue

        def recording(query, key, value, n_heads, kv_n_heads, *args, _fn=fn, **kwargs):
            q = query.unflatten(-1, (n_heads, -1)).transpose(1, 2).float()
            k = key.unflatten(-1, (kv_n_heads, -1)).transpose(1, 2).float()
            k = k.repeat_interleave(n_heads // kv_n_heads, dim=1)
            scale = kwargs.get('softmax_scale') or 1 / math.sqrt(q.shape[-1])
            logits = q @ k.transpose(-1, -2) * scale
            causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
            found.append(logits.masked_select(causal.expand_as(logits)).max().item())
            return _fn(query, key, value, n_heads, kv_n_heads, *args, **kwargs)

        wrapped.append((module, fn))
        module.attn_fn = recording
    if not wrapped:
        return float('nan')
    was_training = model.training
    model.eval()
    try:
        model(batch)
    finally:
        model.train(was_training)
        for module, fn in wrapped:
            module.attn_fn = fn
    return max(found) if found else float('nan')


def _register_callbacks() -> None:
    from llmfoundry import registry

    from wesar_composer.tools.progress import register_progress_callback

    register_progress_callback()
    if RECORDER_CALLBACK not in registry.callbacks:
        registry.callbacks.register(RECORDER_CALLBACK, func=LossRecorder)


def diverged(val_loss: float, losses: Sequence[Optional[float]]) -> bool:
    """Diverged: a non-finite loss, or a training loss at the end (mean of the last 10 batches) no
    lower than at the first batch."""
    if not math.isfinite(val_loss) or not losses or any(x is None for x in losses):
        return True
    return statistics.fmean(losses[-10:]) >= cast(float, losses[0])  # no None left (checked above)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from wesar_composer.tools.console import quiet_known_noise

    quiet_known_noise()  # the rest of a run's output goes to its log file


def run_one(
    spec: RunSpec,
    scale: Scale,
    shapes: dict[str, dict[str, int]],
    data_root: str,
    out_dir: str,
    demo_yaml: Optional[str] = None,
) -> dict:
    """Train one run through llm-foundry (``tools.training.train_one``) and return its :class:`Row` as a dict."""
    from wesar_composer.tools.mlflow_reads import update_ratio_gap
    from wesar_composer.tools.training import train_one

    out = Path(out_dir)
    _register_callbacks()
    tracking_uri = str((out / 'mlruns').resolve())
    cfg = build_config(spec, scale, shapes, data_root, tracking_uri, out, demo_yaml)
    (out / 'logs').mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            result = train_one(cfg, spec.method, out / 'logs' / f'{spec.name}.log', tag=TAG, label=spec.name)
            break
        except FileExistsError as e:
            # two processes that open streaming datasets at the same moment can pick the same
            # shared-memory name; the dataset is not built yet, so the run starts again
            if attempt == 2:
                raise
            _say(f'{spec.name}: {e}; starting again')
            time.sleep(1 + random.random() * 2)
    d_over_u_last = float('nan')
    if result.run_id is not None:
        _, last = update_ratio_gap(tracking_uri, result.run_id)
        d_over_u_last = float('nan') if last is None else last
    record = json.loads((out / 'curves' / f'{spec.name}.json').read_text())
    losses = record['loss']
    finite = [x for x in losses if x is not None]
    s = run_settings(spec, scale)
    shape = shapes[spec.shape]
    row = Row(
        group=spec.group,
        method=spec.method,
        label=METHODS[spec.method][0],
        shape=spec.shape,
        d_model=shape['d_model'],
        n_layers=shape['n_layers'],
        seed=spec.seed,
        setting=s['setting'],
        lr=spec.lr,
        batch=s['batch'],
        steps=result.batches,
        warmup=s['warmup'],
        tokens=result.tokens,
        n_params=result.n_params,
        val_loss=result.val_loss,
        val_ppl=result.val_perplexity,
        final_train_loss=statistics.fmean(finite[-10:]) if finite else float('nan'),
        spikes=int(result.spikes or 0),
        diverged=int(diverged(result.val_loss, losses)),
        d_over_u_last=d_over_u_last,
        wall_s=result.wall_seconds,
        batch_s=statistics.median(record['batch_s']) if record['batch_s'] else float('nan'),
        max_attn_logit=float('nan') if record.get('max_attn_logit') is None else record['max_attn_logit'],
        run_name=spec.name,
        run_id=result.run_id or '',
    )
    return asdict(row)


def refine_centres(results_path: Path, scale: Scale) -> dict[tuple[str, str], float]:
    """The study's best learning rate of each (shape, arm) that the refinement runs around; a
    ValueError unless every planned study run is in ``results_path`` (bests of a cut study move)."""
    from wesar_composer.tools.experiments.study import best_lrs

    rows = read_results(results_path)
    done = {r['run_name'] for r in rows}
    missing = [s.name for s in plan(scale, ['study']) if s.name not in done]
    if missing:
        raise ValueError(
            f'--groups refine needs the whole study in {results_path}: {len(missing)} of its planned runs are '
            f'missing (e.g. {missing[0]}); run --groups study into the same --out first'
        )
    return best_lrs(rows)


def run_grid(
    out_dir: Path,
    scale: Scale,
    shapes: dict[str, dict[str, int]],
    groups: Sequence[str],
    jobs: int = 1,
    data_root: Optional[str] = None,
    deadline_s: Optional[float] = None,
    demo_yaml: Optional[str] = None,
    study_best: Optional[dict[tuple[str, str], float]] = None,
) -> list[dict]:
    """Run every planned run not yet in ``results.csv``; ``jobs`` processes of one torch thread each.

    ``deadline_s``: no run starts after this many seconds (the ones left are reported as cut).
    ``demo_yaml``: the base YAML of every run (default: the packaged demo YAML).
    ``study_best``: for group ``refine``, ``refine_centres`` of this folder if already at hand.
    """
    from wesar_composer.tools.data import build_dataset, default_output_dir

    results_path = out_dir / RESULTS_CSV
    if 'refine' in groups and study_best is None:  # before any work
        study_best = refine_centres(results_path, scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = build_dataset(
        data_root or default_output_dir(scale.vocab_size, scale.seq_len, scale.max_chars),
        vocab_size=scale.vocab_size,
        seq_len=scale.seq_len,
        max_chars=scale.max_chars,
        progress=lambda line: _say(f'data: {line}'),
    )
    previous = read_results(results_path)
    done = {r['run_name'] for r in previous}
    planned = plan(scale, groups, study_best, shapes, ablation_rows=previous)
    todo = [s for s in planned if s.name not in done]
    if any(s.monitor for s in todo):  # created once here: two workers creating it at once collide
        import mlflow

        mlflow.set_tracking_uri(str((out_dir / 'mlruns').resolve()))
        if mlflow.get_experiment_by_name(MLFLOW_EXPERIMENT) is None:
            mlflow.create_experiment(MLFLOW_EXPERIMENT)
    _say(f'{len(todo)} runs to make ({len(done)} already in {results_path}), {jobs} at a time')
    start = time.perf_counter()
    queue = list(todo)

    def record(spec: RunSpec, row: dict) -> None:
        _append_row(results_path, row)
        _say(
            f'{spec.name}: val loss {row["val_loss"]:.3f} (ppl {row["val_ppl"]:.1f}), spikes '
            f'{row["spikes"]}, diverged {row["diverged"]}, {row["wall_s"]:.0f} s '
            f'[{(time.perf_counter() - start) / 60:.1f} min]'
        )

    if jobs == 1:  # in this process
        while queue and (deadline_s is None or time.perf_counter() - start < deadline_s):
            spec = queue.pop(0)
            record(spec, run_one(spec, scale, shapes, str(data.root.resolve()), str(out_dir), demo_yaml))
    else:
        _run_pool(
            queue, jobs, deadline_s, start, record, scale, shapes, str(data.root.resolve()), str(out_dir), demo_yaml
        )
    if queue:
        _say(f'deadline reached: {len(queue)} runs not started: {[s.name for s in queue]}')
    (out_dir / 'grid.json').write_text(
        json.dumps(
            {
                'scale': asdict(scale),
                'shapes': shapes,
                'groups': list(groups),
                'jobs': jobs,
                'planned': [s.name for s in planned],
                'not_started': [s.name for s in queue],
                'data': {
                    'root': str(data.root),
                    'train_tokens': data.tokens['train'],
                    'val_tokens': data.tokens['val'],
                },
            },
            indent=1,
        )
    )
    return read_results(results_path)


def _run_pool(queue, jobs, deadline_s, start, record, scale, shapes, data_root, out_dir, demo_yaml=None) -> None:
    """``jobs`` worker processes of one torch thread each; a failed run is reported, the rest go on."""
    import multiprocessing

    with ProcessPoolExecutor(
        max_workers=jobs, initializer=_init_worker, initargs=(1,), mp_context=multiprocessing.get_context('spawn')
    ) as pool:
        pending = {}

        def submit_next() -> None:
            if queue and (deadline_s is None or time.perf_counter() - start < deadline_s):
                spec = queue.pop(0)
                pending[pool.submit(run_one, spec, scale, shapes, data_root, out_dir, demo_yaml)] = spec

        for _ in range(jobs):
            submit_next()
        while pending:
            future = next(as_completed(pending))
            spec = pending.pop(future)
            try:
                row = future.result()
            except Exception as e:  # noqa: BLE001 - a failed run is reported, the grid goes on
                _say(f'{spec.name}: FAILED: {type(e).__name__}: {e}')
            else:
                record(spec, row)
            submit_next()
