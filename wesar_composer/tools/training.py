"""One run of the tools through llm-foundry's own train path, and what the report needs from it.

:func:`train_one` trains a config (the demo YAML with a method) with ``llmfoundry.command_utils.train``,
sends llm-foundry's console output to a log file and keeps the :class:`~wesar_composer.tools.progress.DemoProgress`
lines on the console; :class:`RunResult` holds its validation loss, spikes, wall time and MLflow run id.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wesar_composer.tools.console import DEFAULT_TAG, output_to, quiet_known_noise
from wesar_composer.tools.progress import PROGRESS_CALLBACK, spike_count

__all__ = ['RunResult', 'train_one']


@dataclass
class RunResult:
    """What the report needs from one run."""

    method: str
    run_name: str
    run_id: Optional[str]
    val_loss: float
    val_perplexity: float
    spikes: Optional[int]
    wall_seconds: float
    batches: int
    tokens: int
    d_over_u: Optional[float] = None  # median over logged steps of ratio_d / ratio_u, mean over layers
    d_over_u_last: Optional[float] = None  # the same, last layer only
    n_params: int = 0  # gates aside


def _mlflow_run_id(trainer) -> Optional[str]:
    for destination in trainer.logger.destinations:
        if type(destination).__name__ == 'MLFlowLogger':
            return getattr(destination, '_run_id', None)
    return None


def _result(trainer, method: str, wall: float) -> RunResult:
    metrics = trainer.state.eval_metrics.get('eval', {})
    if 'LanguageCrossEntropy' not in metrics:
        raise RuntimeError(f'The {method} run has no eval metrics; is eval_loader set in the demo YAML?')
    val_loss = float(metrics['LanguageCrossEntropy'].compute())
    return RunResult(
        method=method,
        run_name=str(trainer.state.run_name),
        run_id=_mlflow_run_id(trainer),
        val_loss=val_loss,
        val_perplexity=math.exp(val_loss),
        spikes=spike_count(trainer.state.callbacks),
        wall_seconds=wall,
        batches=trainer.state.timestamp.batch.value,
        tokens=trainer.state.timestamp.token.value,
        n_params=sum(p.numel() for name, p in trainer.state.model.named_parameters() if not name.endswith('gate')),
    )


def train_one(
    cfg, method: str, log_path: Optional[Path] = None, tag: str = DEFAULT_TAG, label: Optional[str] = None
) -> RunResult:
    """Train one method through llm-foundry's train path and collect its results.

    llm-foundry's console output (the resolved config, warnings) goes to ``log_path`` if given;
    the progress lines of :class:`~wesar_composer.tools.progress.DemoProgress` stay on the
    console, as ``[tag] label: ...`` (label: the method by default). The progress callback must
    be registered (:func:`~wesar_composer.tools.progress.register_progress_callback`).
    """
    from llmfoundry.command_utils import train
    from omegaconf import OmegaConf as om

    quiet_known_noise()
    cfg = om.merge(
        cfg,
        om.create(
            {
                'variables': {'method': method},
                'progress_bar': False,
                'callbacks': {PROGRESS_CALLBACK: {'label': label or method, 'tag': tag}},
            }
        ),
    )
    start = time.perf_counter()
    with output_to(log_path) if log_path is not None else contextlib.nullcontext():
        trainer = train(cfg)
        wall = time.perf_counter() - start
        try:
            result = _result(trainer, method, wall)
        finally:
            trainer.close()  # ends the MLflow run and flushes its metrics
    return result
