"""Detect an outlier batch before its optimizer step, and log it, skip its update or stop the run.

(About 360 lines, of which the class docstring, the reference of its rule, actions and keys,
takes 70.)
"""

from __future__ import annotations

import logging
import math
import types
from collections import deque
from typing import Any, Optional

import torch
from composer.core import Callback, Precision, State
from composer.loggers import Logger
from composer.utils import dist

from wesar_composer.callbacks.post_mortem import emit, lr_phase, post_mortem_text
from wesar_composer.callbacks.sharding import ShardInfo, fsdp1_shards, grad_sq_share
from wesar_composer.callbacks.spike_detection import RULES, SpikeDetector, check_choice, check_positive_int
from wesar_composer.callbacks.update_ratio_monitor import find_monitor
from wesar_composer.reparam.checks import CheckedHparams

log = logging.getLogger(__name__)

__all__ = ['ACTIONS', 'SpikeGuard']

ACTIONS = ('log', 'skip', 'stop')
DEFAULT_ACTION = 'skip'
# OLMo-core's SkipStepAdamW: skip when the loss (or gradient norm) is 6 standard deviations above
# the mean of the last 128 steps. Here the robust form: 6 robust sigmas above the median.
DEFAULT_RULE = 'zscore'
DEFAULT_THRESHOLD = 6.0
DEFAULT_WINDOW = 128
# OLMo-core waits for half its window (64 steps); the median of 3 values already ignores one outlier,
# and a divergence in the first steps (often during warmup) must not enter the window unseen.
DEFAULT_MIN_HISTORY = 3
DEFAULT_MAX_SKIPS = 4  # 'stop': skipped batches before the run ends (KillLossSpike's patience is 4 batches)
# 'skip': outlier batches in a row after which the loss is taken to be high because of the weights, not of
# a batch (skipping more would freeze the run): the update is applied and the window starts again.
DEFAULT_MAX_CONSECUTIVE = 8
DEFAULT_NAME_MATRICES = 5
SKIPPED_TABLE = 'spike_guard/skipped_batches'
SKIPPED_COLUMNS = ['batch', 'epoch', 'first_sample_in_epoch', 'last_sample_in_epoch', 'loss', 'reason']
KEPT_RECORDS = 1000  # skipped batches kept in memory and in checkpoints (all are logged)
OWNER = 'spike_guard'


class SpikeGuard(CheckedHparams, Callback):
    """Tests every batch's loss (and optionally the gradient norm) before the optimizer step; logs, skips or stops.

    Composer steps with a closure (``optimizer.step(closure=...)``): the forward and backward
    passes run inside ``step``. The guard wraps each optimizer's ``step`` for the run: the
    wrapper runs the closure, all-reduces the batch loss (and the gradient norm's square) once,
    so every rank takes the same decision from the same numbers, tests them against a running
    window (:class:`~wesar_composer.callbacks.spike_detection.SpikeDetector`), and calls the
    optimizer's own ``step`` or not. A skipped batch leaves every parameter and the whole
    optimizer state (moments, step counts) exactly as they were: the optimizer never ran. It
    works with any torch optimizer and with gradient accumulation (the closure covers every
    microbatch), with or without WeSaR, under DDP, FSDP and FSDP2 (DDP and FSDP2 tested over gloo;
    Composer's FSDP1 needs CUDA and is untested). The wrapper is removed at the end of ``fit``.

    A skipped batch still counts as trained: the timestamp, the learning-rate schedule and the
    dataloader move on. Buffers that the forward pass updates (running statistics) are not
    restored.

    Rule (defaults from OLMo-core's ``SkipStepAdamW``, 6 standard deviations over 128 steps, in
    a robust form)::

        zscore:  (value - median) / max(1.4826 * MAD, 0.01 * median) >= threshold      threshold 6
        ratio:   value >= threshold * median                          (KillLossSpike: 2 x its mean)

    over the last ``window`` values that were not outliers, after ``min_history`` of them; a loss
    that is not finite is an outlier from the first batch.

    Actions: ``log`` writes a warning and lets the step happen; ``skip`` skips the update;
    ``stop`` skips it too and ends the run (``state.stop_training()``, a normal end with
    checkpoints) once ``max_skips`` batches were skipped, naming them. A loss that stays high
    batch after batch is that of the weights, not of a batch: after ``max_consecutive`` skipped
    batches in a row, ``skip`` applies the update, says so, and starts its window again (skipping
    on would freeze the run). Every outlier batch is
    written in the run's log on a line of its own (batch, loss against the window, the
    learning-rate phase, and the update-ratio post-mortem when an ``update_ratio_monitor`` runs
    beside it; inside a run of consecutive outliers, at its 1st, 2nd, 4th, 8th, ... batch); skipped batches are logged as a table ``spike_guard/skipped_batches`` with the
    positions of their samples in the epoch's order (Composer's ``sample_in_epoch``, counted over
    all ranks), so that the data can be looked at, or left out on resume.

    +------------------------------+----------------------------------------------------+
    | Key                          | Logged value                                       |
    +==============================+====================================================+
    | ``spike_guard/skipped``      | batches whose update was skipped, so far           |
    | ``spike_guard/outliers``     | outlier batches so far (whatever the action)       |
    | ``spike_guard/loss_score``   | the loss's z-score or ratio (once detecting)       |
    +------------------------------+----------------------------------------------------+

    Cost: one all-reduce of two numbers and one host sync per batch (Composer's closure already
    syncs for the loss). With ``grad_norm: true``, one pass over the gradients after each
    backward pass (the norm before clipping).

    Args:
        action: ``'log'``, ``'skip'`` (default) or ``'stop'``.
        rule: ``'zscore'`` (default) or ``'ratio'``.
        threshold: robust standard deviations above the median (``zscore``, default 6) or a
            multiple of the median above 1 (``ratio``).
        window: non-outlier values whose median is the reference (>= 2). Default 128.
        min_history: values seen before detection starts (2 to ``window``). Default 3.
        grad_norm: also test the global gradient norm (before clipping). Default False.
        max_skips: with ``action: stop``, skipped batches before the run ends (>= 1). Default 4.
        max_consecutive: with ``action: skip``, outlier batches in a row that are skipped before
            the guard gives way (>= 1). Default 8.
        name_matrices: matrices named in the post-mortem line (0: none). Default 5.
    """

    def __init__(
        self,
        action: str = DEFAULT_ACTION,
        rule: str = DEFAULT_RULE,
        threshold: float = DEFAULT_THRESHOLD,
        window: int = DEFAULT_WINDOW,
        min_history: int = DEFAULT_MIN_HISTORY,
        grad_norm: bool = False,
        max_skips: Optional[int] = None,
        max_consecutive: Optional[int] = None,
        name_matrices: int = DEFAULT_NAME_MATRICES,
    ):
        check_choice(OWNER, 'action', action, ACTIONS)
        check_choice(OWNER, 'rule', rule, RULES)
        if not isinstance(grad_norm, bool):
            raise ValueError(f'{OWNER}: grad_norm must be true or false, got {grad_norm!r}.')
        if max_skips is not None:
            if action != 'stop':
                raise ValueError(
                    f"{OWNER}: max_skips applies to action 'stop' only; got max_skips={max_skips!r} with action {action!r}."
                )
            check_positive_int(OWNER, 'max_skips', max_skips)
        if max_consecutive is not None:
            if action != 'skip':
                raise ValueError(
                    f"{OWNER}: max_consecutive applies to action 'skip' only; got max_consecutive={max_consecutive!r} "
                    f'with action {action!r}.'
                )
            check_positive_int(OWNER, 'max_consecutive', max_consecutive)
        check_positive_int(OWNER, 'name_matrices', name_matrices, minimum=0)
        self.action = action
        self.rule = rule
        self.threshold = threshold
        self.window = window
        self.min_history = min_history
        self.grad_norm = grad_norm
        self.max_skips = max_skips if max_skips is not None else DEFAULT_MAX_SKIPS
        self.max_consecutive = max_consecutive if max_consecutive is not None else DEFAULT_MAX_CONSECUTIVE
        self.name_matrices = name_matrices
        self.loss_detector = SpikeDetector(OWNER, rule, threshold, window, min_history)
        self.grad_detector = SpikeDetector(OWNER, rule, threshold, window, min_history)
        self.skipped = 0
        self.outliers = 0
        self.skipped_batches: deque[dict[str, Any]] = deque(maxlen=KEPT_RECORDS)
        self._pending: Optional[dict[str, Any]] = None  # the decision of the batch in progress
        self._score: Optional[float] = None
        self._grad_sq: Optional[torch.Tensor] = None
        self._wrapped: list[tuple[Any, Any]] = []  # (optimizer, its step before the guard)
        self._shard_info: ShardInfo = {}
        self._device: Any = None
        self._lrs: deque[float] = deque(maxlen=2)
        self._checked = False  # whether the step of the batch in progress went through the guard
        self._run = 0  # consecutive outlier batches up to this one

    # --- Composer events -------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        optimizers = list(state.optimizers or [])
        if not optimizers:
            raise ValueError(f'{OWNER} needs an optimizer to guard; the Trainer has none.')
        if state.precision == Precision.AMP_FP16 and not all(
            getattr(o, '_step_supports_amp_closure', False) for o in optimizers
        ):
            raise ValueError(
                f'{OWNER}: with precision amp_fp16 and {type(optimizers[0]).__name__}, Composer steps the optimizer '
                'without a closure, so the loss is not known when it steps. Use precision amp_bf16 (or fp32).',
            )
        self._shard_info, _ = fsdp1_shards(state.model)
        self._device = state.device
        self._unwrap()
        for optimizer in optimizers:
            self._wrap(optimizer)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._unwrap()

    def close(self, state: State, logger: Logger) -> None:
        self._unwrap()

    def batch_start(self, state: State, logger: Logger) -> None:
        self._pending = None
        self._checked = False
        self._grad_sq = None
        if state.optimizers:
            self._lrs.append(float(state.optimizers[0].param_groups[0]['lr']))

    def after_backward(self, state: State, logger: Logger) -> None:
        if self.grad_norm:  # the last microbatch's backward leaves the batch's whole gradient
            params = [p for group in state.optimizers[0].param_groups for p in group['params']]
            self._grad_sq = grad_sq_share(params, self._shard_info, dist.get_world_size())

    def batch_end(self, state: State, logger: Logger) -> None:
        pending, self._pending = self._pending, None
        metrics: dict[str, float] = {'spike_guard/skipped': self.skipped, 'spike_guard/outliers': self.outliers}
        if self._score is not None:
            metrics['spike_guard/loss_score'] = self._score
        logger.log_metrics(metrics)
        if self._wrapped and not self._checked:
            raise RuntimeError(
                f'{OWNER}: the optimizer step of batch {state.timestamp.batch.value:,} did not pass through the guard.'
            )
        if pending is not None:
            self._report(state, logger, pending)

    # --- the decision inside the optimizer step ------------------------------------------------

    def _wrap(self, optimizer: Any) -> None:
        inner = optimizer.step  # an instance attribute when a torch LR scheduler already wrapped it
        guard = self

        def step(opt: Any, closure: Any = None, **kwargs: Any) -> Any:
            if closure is None:
                raise RuntimeError(
                    f'{OWNER}: {type(opt).__name__}.step() was called without a closure, so the batch loss is not '
                    'known before the step. Composer steps with a closure unless precision is amp_fp16.',
                )
            with torch.enable_grad():
                loss = closure()
            if not guard._decide(loss):
                return loss
            first = [loss]

            def replay(*args: Any, **kw: Any) -> Any:  # the first call returns the loss already computed
                return first.pop() if first else closure(*args, **kw)

            return inner(closure=replay, **kwargs)

        if hasattr(inner, '_wrapped_by_lr_sched'):  # keeps torch's LR scheduler from warning of an override
            step._wrapped_by_lr_sched = True  # pyright: ignore[reportFunctionMemberAccess]
        own = 'step' in vars(optimizer)  # the step the guard found on the instance, not the class's
        optimizer.step = types.MethodType(step, optimizer)
        self._wrapped.append((optimizer, inner if own else None))

    def _unwrap(self) -> None:
        for optimizer, inner in self._wrapped:
            if inner is not None:
                optimizer.step = inner
            elif 'step' in vars(optimizer):
                del optimizer.step  # back to the class's step
        self._wrapped = []

    def _decide(self, loss: Any) -> bool:
        """Test the batch on numbers every rank shares; returns whether the optimizer may step."""
        self._checked = True
        world = dist.get_world_size()
        shared = torch.zeros(2, dtype=torch.float64)
        if self._device is not None:
            shared = self._device.tensor_to_device(shared)
        # Composer's closure returns this rank's loss (a float; a tensor under a closure grad scaler: no sync here)
        shared[0] = (loss.detach().to(shared) if isinstance(loss, torch.Tensor) else float(loss)) / world
        if self._grad_sq is not None:
            shared[1] = self._grad_sq
        if world > 1:
            dist.all_reduce(shared, reduce_operation='SUM')
        mean_loss, total_grad_sq = shared.tolist()  # the one host sync of the guard
        loss_verdict = self.loss_detector.check(mean_loss)
        grad_verdict = self.grad_detector.check(math.sqrt(total_grad_sq)) if self.grad_norm else None
        self._score = loss_verdict.score
        outlier = loss_verdict.outlier or bool(grad_verdict and grad_verdict.outlier)
        if not outlier:
            self._run = 0
            self.loss_detector.values.append(mean_loss)
            if grad_verdict is not None:
                self.grad_detector.values.append(grad_verdict.value)
            return True
        self.outliers += 1
        self._run += 1
        reasons = (
            [f'loss {self.loss_detector.describe(loss_verdict, "accepted losses")}'] if loss_verdict.outlier else []
        )
        if grad_verdict is not None and grad_verdict.outlier:
            reasons.append(f'gradient norm {self.grad_detector.describe(grad_verdict, "accepted norms")}')
        skip = self.action != 'log'
        if self.action == 'skip' and self._run > self.max_consecutive:
            skip = False
            reasons.append(
                f'{self._run} outlier batches in a row (max_consecutive={self.max_consecutive}): the loss stays high with '
                'these weights, whatever the batch, so this update is applied and the window starts again from here'
            )
            self._run = 0
            self.loss_detector.values.clear()
            self.grad_detector.values.clear()
        self.skipped += int(skip)
        self._pending = {'loss': mean_loss, 'reason': '; '.join(reasons), 'skipped': skip}
        return not skip

    # --- reporting ----------------------------------------------------------------------------

    def _report(self, state: State, logger: Logger, pending: dict[str, Any]) -> None:
        batch = state.timestamp.batch.value  # the count after this batch, as the monitor's steps
        first = state.previous_timestamp.sample_in_epoch.value if state.previous_timestamp else 0
        last = state.timestamp.sample_in_epoch.value - 1
        epoch = state.timestamp.epoch.value
        text = ''
        if self.name_matrices:
            text, _ = post_mortem_text(find_monitor(state), batch, self.name_matrices)
        did = 'update skipped' if pending['skipped'] else f'update applied (action: {self.action})'
        run = self._run
        streak = f', {run} outlier batches in a row' if run > 1 else ''
        line = (
            f'batch {batch:,}: outlier{lr_phase(self._lrs)}{streak}, {did} ({self.skipped} skipped so far): '
            f'{pending["reason"]}. Samples {first:,}-{last:,} of epoch {epoch}.'
        )
        if (
            run & (run - 1) and pending['skipped']
        ):  # inside a run of outliers, a warning at 1, 2, 4, 8, ... batches; the rest at debug
            log.debug(line)
        else:
            emit(log, logging.WARNING, line + text, logger.destinations)
        if not pending['skipped']:
            return
        record = {
            'batch': batch,
            'epoch': epoch,
            'first_sample_in_epoch': first,
            'last_sample_in_epoch': last,
            'loss': pending['loss'],
            'reason': pending['reason'],
        }
        self.skipped_batches.append(record)
        logger.log_table(
            SKIPPED_COLUMNS,
            [[record[c] for c in SKIPPED_COLUMNS] for record in self.skipped_batches],
            name=SKIPPED_TABLE,
            step=batch,
        )
        if self.action == 'stop' and self.skipped >= self.max_skips:
            named = ', '.join(f'{r["batch"]:,}' for r in self.skipped_batches)
            emit(
                log,
                logging.ERROR,
                f'batch {batch:,}: stopping training after {self.skipped} skipped batches (max_skips={self.max_skips}): '
                f'batches {named}.',
                logger.destinations,
            )
            state.stop_training()

    def state_dict(self) -> dict[str, Any]:
        return {
            'loss_window': self.loss_detector.state_dict(),
            'grad_window': self.grad_detector.state_dict(),
            'skipped': self.skipped,
            'outliers': self.outliers,
            'skipped_batches': list(self.skipped_batches),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_detector.load_state_dict(state['loss_window'])
        self.grad_detector.load_state_dict(state['grad_window'])
        self.skipped = state['skipped']
        self.outliers = state['outliers']
        self.skipped_batches = deque(state['skipped_batches'], maxlen=KEPT_RECORDS)
