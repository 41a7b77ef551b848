"""Monitor the update ratio ||W_after - W_before|| / ||W_before|| of every weight matrix.

The callback itself; its volume options and summaries are in ``monitor_options``, the shard
arithmetic in ``sharding``, the norms in ``norms`` and the spike post-mortem that reads its
history in ``post_mortem``. (About 380 lines, of which the class docstring, the reference of
its keys and options, takes 80.)
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union, cast

import torch
import torch.distributed as torch_dist
from composer.core import Callback, State
from composer.loggers import Logger
from torch import nn

from wesar_composer.callbacks.keys import FAMILIES, matrix_key
from wesar_composer.callbacks.monitor_options import LayersArg, check_families, check_layers, resolve_layers, summaries
from wesar_composer.callbacks.norms import slice_sq_norms
from wesar_composer.callbacks.post_mortem import RatioRise, ratio_rise
from wesar_composer.callbacks.sharding import (
    ShardInfo,
    dtensor_shard_group,
    fsdp1_shards,
    global_numel,
    is_dtensor,
    is_sharded,
    local_part,
    local_tensor,
    lookup,
    modules_by_name,
)
from wesar_composer.reparam.checks import CheckedHparams
from wesar_composer.roles import find_matrices, merged_role_map, unwrap

log = logging.getLogger(__name__)

__all__ = ['RatioRise', 'UpdateRatioMonitor', 'find_monitor']

DEFAULT_LOG_INTERVAL = 10  # batches, as Composer's OptimizerMonitor
# grad_norm sorts before loss/ on an alphabetical dashboard; 50 keys a step at 40 layers
DEFAULT_FAMILIES = ('update_ratio', 'param_norm', 'grad_norm')
DEFAULT_LAYERS = (0, -1)  # first and last layer per matrix; every layer enters the summaries
DEFAULT_HISTORY = 16  # logged steps of every matrix's update ratio kept for the spike post-mortem
OWNER = 'UpdateRatioMonitor'


@dataclass
class _Matrix:
    """One measured weight matrix: where it lives, its global shape and its row slices."""

    name: str  # module name relative to the unwrapped model
    shape: tuple[int, int]  # global (rows, d_in), read before any sharding
    keys: tuple[str, ...]  # one key suffix per slice: 'L3/q' or 'e'
    slice_sizes: tuple[int, ...]
    layer: Optional[int]
    roles: tuple[str, ...]
    module: Optional[nn.Module] = field(default=None, repr=False)
    gates: list[tuple[tuple[str, ...], torch.Tensor]] = field(default_factory=list, repr=False)  # (keys, gate)


class UpdateRatioMonitor(CheckedHparams, Callback):
    """Logs the update ratio of every weight matrix, per layer and role, with its norms and gate.

    The update ratio (Nishida et al. 2024, Figures 1, 4, 5, 9-12) is measured, not reconstructed
    from optimizer state: on a logging batch the monitor copies each weight W before the
    optimizer step (``Event.AFTER_TRAIN_BATCH``) and compares it with W after the step
    (``Event.BATCH_END``)::

        update_ratio = ||W_after - W_before|| / ||W_before||

    W is the actual parameter (for WeSaR, the matrix without its gate). Matrices are found by
    the same role discovery as the WeSaR algorithm (:func:`wesar_composer.roles.find_matrices`),
    so a gated run and a plain baseline log the same keys. A fused ``Wqkv`` is reported per
    q/k/v slice.

    +-------------------------------------------+------------------------------------------------+
    | Key                                       | Logged value                                   |
    +===========================================+================================================+
    | ``update_ratio/L{layer}/{role}``          | ||dW|| / ||W_before|| of that matrix (slice)   |
    | ``update_ratio/e``, ``update_ratio/p``    | the same for the embedding and the head        |
    +-------------------------------------------+------------------------------------------------+
    | ``param_norm/...``                        | ||W_before||, the Frobenius norm before the step|
    +-------------------------------------------+------------------------------------------------+
    | ``grad_norm/...``                         | ||grad W|| of the gradient the step consumed    |
    +-------------------------------------------+------------------------------------------------+
    | ``gate/...``                              | the gate a_r before the step (gated runs only;  |
    |                                           | a tied head has ``gate/p`` and shares W_e)      |
    +-------------------------------------------+------------------------------------------------+
    | ``update_ratio/max``                      | the largest update ratio of this step          |
    | ``update_ratio/last_layer_d_over_u``      | ratio(W_d) / ratio(W_u) in the last layer:     |
    |                                           | the gap of the paper's Figure 1                |
    +-------------------------------------------+------------------------------------------------+

    Roles: ``e q k v o u g d p`` (``g``: the gate projection of a GLU FFN).

    The gradient norm is that of the gradient *after* clipping (and after AMP unscaling): the
    monitor reads it at ``Event.AFTER_TRAIN_BATCH``, where Composer runs algorithms such as
    ``GradientClipping`` before callbacks. It is the gradient the optimizer consumed, so
    ``update_ratio``, ``grad_norm`` and ``param_norm`` describe the same step (for plain SGD,
    update_ratio = lr * grad_norm / param_norm exactly); a global clip scales every matrix alike,
    so the relative sizes across matrices are those of the raw gradient.

    Cost: nothing on batches it does not log (no copy, no norm). On a logging batch it holds
    one extra copy of the weights it measures (the local shard under FSDP), freed at the end
    of the batch, and reads the weights and differences once each, and the gradients of the
    matrices with ``grad_norm/`` keys, with one host sync per log.

    Distributed: under DDP every rank holds the full weights and the averaged gradients, so
    the values are local. Under FSDP (``use_orig_params: true``, Composer's default) or FSDP2
    each rank holds a shard: the monitor sums squares over its part of every matrix and slice
    and all-reduces one vector over the shard group, as Composer's ``OptimizerMonitor`` does
    (which itself fails under FSDP2, composer issue 3920; this monitor is tested there).

    Volume: every matrix is measured on a logging batch, but only some keys are logged, so a
    40-layer model's dashboard stays readable. By default: the summary keys, and
    ``update_ratio/``, ``param_norm/`` and ``grad_norm/`` of the first and last layer and of e and
    p (50 keys a step for a 40-layer MPT instead of 976). ``families='all', layers='all'`` logs every key.

    Args:
        log_interval: log every ``log_interval`` batches (batches ``log_interval``,
            ``2 * log_interval``, ...). Default 10.
        role_map: extra ``{regex: role}`` entries for module names the default role map misses;
            give the WeSaR algorithm the same map.
        families: the per-matrix key families to log, a list drawn from ``update_ratio``,
            ``param_norm``, ``grad_norm`` and ``gate``, or ``'all'``; ``[]`` logs the summary keys
            only. Default ``['update_ratio', 'param_norm', 'grad_norm']``.
        layers: the layers whose matrices get per-matrix keys: ``'all'``, a list of layer
            indices (negative ones count back from the last: ``[0, -1]``, the default), or
            ``{'every': k}`` for layers 0, k, 2k, ... and the last. e and p are logged with their
            families whatever the layers.
        summaries: log ``update_ratio/max``, ``update_ratio/last_layer_d_over_u`` and
            ``update_ratio/mean_{role}`` (over every layer, logged or not). Default True.
        history: logged steps of every matrix's update ratio kept in memory (logged as metrics
            or not) for :meth:`ratio_rise`, the matrices that ``LossSpikeCounter`` and
            ``SpikeGuard`` name when a spike starts. At least 2. Default 16.
    """

    def __init__(
        self,
        log_interval: int = DEFAULT_LOG_INTERVAL,
        role_map: Optional[Mapping[str, str]] = None,
        families: Union[str, Sequence[str]] = DEFAULT_FAMILIES,
        layers: LayersArg = DEFAULT_LAYERS,
        summaries: bool = True,
        history: int = DEFAULT_HISTORY,
    ):
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f'log_interval must be a positive integer (batches), got {log_interval!r}.')
        merged_role_map(role_map)  # validates the entries now, before training starts
        self.families = check_families(families)
        self.layers = check_layers(layers)
        if not isinstance(summaries, bool):
            raise ValueError(f'summaries must be true or false, got {summaries!r}.')
        if not self.families and not summaries:
            raise ValueError(
                'families is empty and summaries is false: nothing would be logged. '
                f'Name families from {list(FAMILIES)} or set summaries: true.',
            )
        if isinstance(history, bool) or not isinstance(history, int) or history < 2:
            raise ValueError(f'history must be an integer >= 2 (logged steps kept), got {history!r}.')
        self.log_interval = log_interval
        self.role_map = dict(role_map) if role_map else None
        self.summaries = summaries
        self.history = history
        self._history: deque[tuple[int, list[float]]] = deque(maxlen=history)  # (batch, ratio per key)
        self._latest_ratios: Optional[list[float]] = None
        self._logged: frozenset[str] = frozenset()  # key suffixes ('L3/q', 'e') with per-matrix keys
        self._matrices: Optional[list[_Matrix]] = None
        self._model: Optional[nn.Module] = None
        self._shard_info: ShardInfo = {}  # FSDP1: id(param) -> (flat start, global numel)
        self._group: Any = None
        self._sharded = False
        self._snapshot: Optional[list[torch.Tensor]] = None
        self._pre_step: Optional[torch.Tensor] = None

    # --- Composer events -------------------------------------------------------------------

    def init(self, state: State, logger: Logger) -> None:
        # Event.INIT comes before FSDP shards the model, so the global shapes can be read here.
        self.discover(state.model)

    def fit_start(self, state: State, logger: Logger) -> None:
        self.attach(state.model)

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if (state.timestamp.batch.value + 1) % self.log_interval != 0:
            return
        self.begin_step()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._snapshot is None:
            return
        logger.log_metrics(self.end_step())
        self._history.append((state.timestamp.batch.value, self._latest_ratios))

    # --- the spike post-mortem -----------------------------------------------------------------

    @property
    def keys(self) -> list[str]:
        """Every measured matrix (slice) as its key suffix, ``'L3/q'`` or ``'e'``, in model order."""
        if self._matrices is None:
            raise RuntimeError('UpdateRatioMonitor has not seen the model yet (it reads it at Event.INIT).')
        return [key for m in self._matrices for key in m.keys]

    @property
    def logged_keys(self) -> frozenset[str]:
        """The key suffixes that get per-matrix keys under the ``families`` and ``layers`` chosen."""
        return self._logged

    def ratio_rise(self, before_batch: Optional[int] = None) -> Optional[RatioRise]:
        """Which update ratios rose most before ``before_batch``: :func:`post_mortem.ratio_rise` on the kept steps."""
        return ratio_rise(self._history, self.keys, before_batch)

    # --- measurement, usable outside a Trainer ----------------------------------------------

    def discover(self, model: nn.Module) -> None:
        """Find the weight matrices and their global shapes; call before the model is sharded."""
        matrices = []
        for spec in find_matrices(model, self.role_map):
            shape = tuple(spec.module.weight.shape)
            if len(shape) != 2:
                raise ValueError(
                    f'{spec.name}: weight has shape {shape}, expected a matrix. UpdateRatioMonitor must see the model '
                    'before it is sharded: add it to the Trainer callbacks (it reads shapes at Event.INIT).',
                )
            keys = tuple(matrix_key(spec.layer, role) for role in spec.roles)
            matrices.append(_Matrix(spec.name, shape, keys, spec.slice_sizes, spec.layer, spec.roles))
        seen: dict[str, str] = {}
        for matrix in matrices:
            for key in matrix.keys:
                if key in seen:
                    raise ValueError(
                        f'Modules {seen[key]!r} and {matrix.name!r} both map to update_ratio/{key}; '
                        'give one of them another role with role_map.',
                    )
                seen[key] = matrix.name
        if not matrices:
            raise ValueError(
                f'UpdateRatioMonitor found no weight matrix with a role in {type(unwrap(model)).__name__}; '
                'pass role_map={regex: role} naming its modules.',
            )
        layers = resolve_layers(self.layers, sorted({m.layer for m in matrices if m.layer is not None}))
        self._logged = frozenset(key for m in matrices for key in m.keys if m.layer is None or m.layer in layers)
        self._matrices = matrices
        self._history.clear()

    def attach(self, model: nn.Module) -> None:
        """Bind to the model as it trains (wrapped by DDP or FSDP, gated or not)."""
        if self._matrices is None:
            self.discover(model)
        assert self._matrices is not None
        self._shard_info, fsdp_groups = fsdp1_shards(model)
        modules = modules_by_name(model)
        for matrix in self._matrices:
            matrix.module = lookup(modules, matrix.name, OWNER)
            matrix.gates = _gates(matrix, self._shard_info)
        self._model = model
        self._group = fsdp_groups[0] if fsdp_groups else None
        self._sharded = bool(self._shard_info)
        for matrix in self._matrices:
            assert matrix.module is not None  # looked up above
            for tensor in [matrix.module.weight, *(gate for _, gate in matrix.gates)]:  # FSDP2
                if is_dtensor(tensor) and is_sharded(tensor, {}):
                    self._sharded = True
                    self._group = dtensor_shard_group(tensor)
        self._snapshot = None

    @torch.no_grad()
    def begin_step(self) -> None:
        """Before the optimizer step: norms of W and of its gradient, gates, and a copy of W."""
        if self._model is None:
            raise RuntimeError('UpdateRatioMonitor.begin_step called before attach(model).')
        weights = self._local_weights()
        weight_sq = slice_sq_norms(weights, self._matrices)
        if 'grad_norm' in self.families:  # else the gradients are not read at all
            grads = []
            for matrix, (flat, start) in zip(self._matrices, weights):
                grad = matrix.module.weight.grad
                if grad is None or not any(key in self._logged for key in matrix.keys):
                    grads.append((flat.new_zeros(0), 0))  # no gradient, or no grad_norm key logged: 0
                else:
                    grads.append((local_tensor(grad).reshape(-1), start))
            grad_sq = slice_sq_norms(grads, self._matrices)
        else:
            grad_sq = torch.zeros_like(weight_sq)
        self._pre_step = torch.cat([weight_sq, grad_sq, self._gate_values(weight_sq.device)])
        copies: dict[int, torch.Tensor] = {}  # one copy per parameter: a tied head shares W_e's
        self._snapshot = [
            copies.setdefault(id(m.module.weight), flat.clone()) for m, (flat, _) in zip(self._matrices, weights)
        ]

    @torch.no_grad()
    def end_step(self) -> dict[str, float]:
        """After the optimizer step: measure ||W_after - W_before|| and return the metrics."""
        if self._snapshot is None or self._pre_step is None:
            raise RuntimeError('UpdateRatioMonitor.end_step called without begin_step before the optimizer step.')
        weights = self._local_weights()
        unique = {id(copy): (copy, flat) for copy, (flat, _) in zip(self._snapshot, weights)}
        torch._foreach_sub_(  # pyright: ignore[reportPrivateImportUsage]
            [c for c, _ in unique.values()], [f for _, f in unique.values()]
        )  # copy := W_before - W_after
        diffs = [(copy, start) for copy, (_, start) in zip(self._snapshot, weights)]
        values = torch.cat([self._pre_step, slice_sq_norms(diffs, self._matrices)])
        self._snapshot = None
        self._pre_step = None
        if self._sharded and torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(values, group=self._group)  # sums of squares and gate shards add up
        return self._metrics(values.tolist())

    # --- helpers ----------------------------------------------------------------------------

    def _local_weights(self) -> list[tuple[torch.Tensor, int]]:
        assert self._matrices is not None
        return [
            local_part(cast(nn.Module, m.module).weight, m.shape[0] * m.shape[1], self._shard_info)
            for m in self._matrices
        ]

    def _gate_values(self, device: torch.device) -> torch.Tensor:
        """All gates in one vector; under sharding each rank fills its own elements, zeros elsewhere."""
        assert self._matrices is not None
        parts = [torch.zeros(0, device=device, dtype=torch.float64)]
        for matrix in self._matrices:
            for _, gate in matrix.gates:
                numel = global_numel(gate, self._shard_info)
                flat, start = local_part(gate, numel, self._shard_info)
                full = torch.zeros(numel, device=device, dtype=torch.float64)
                full[start : start + flat.numel()] = flat.double()
                parts.append(full)
        return torch.cat(parts)

    def _metrics(self, values: list[float]) -> dict[str, float]:
        assert self._matrices is not None
        keys = [key for m in self._matrices for key in m.keys]
        gate_keys = [key for m in self._matrices for gate_keys, _ in m.gates for key in gate_keys]
        n = len(keys)
        weight_sq, grad_sq, diff_sq = values[:n], values[n : 2 * n], values[-n:]
        gate_values = values[2 * n : -n]
        assert len(gate_values) == len(gate_keys), (len(gate_values), len(gate_keys))
        ratios = [
            math.sqrt(d_sq) / math.sqrt(w_sq) if w_sq > 0 else float('inf') for w_sq, d_sq in zip(weight_sq, diff_sq)
        ]
        self._latest_ratios = ratios
        families, logged = self.families, self._logged
        metrics: dict[str, float] = {}
        for key, ratio, w_sq, g_sq in zip(keys, ratios, weight_sq, grad_sq):
            if key not in logged:
                continue
            if 'update_ratio' in families:
                metrics[f'update_ratio/{key}'] = ratio
            if 'param_norm' in families:
                metrics[f'param_norm/{key}'] = math.sqrt(w_sq)
            if 'grad_norm' in families:
                metrics[f'grad_norm/{key}'] = math.sqrt(g_sq)
        if 'gate' in families:
            metrics.update(
                {f'gate/{key}': value for key, value in zip(gate_keys, gate_values) if key in logged or '/' not in key}
            )  # e and p (a tied head's own gate) always
        if self.summaries:
            metrics.update(summaries(self._matrices, keys, ratios))
        return metrics


def _gates(matrix: _Matrix, shard_info: ShardInfo) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """(keys, gate) of a gated module: one gate element per slice, plus a tied head's own gate."""
    module = matrix.module
    gates = []
    gate = getattr(module, 'gate', None)
    if isinstance(gate, torch.Tensor):
        numel = global_numel(gate, shard_info)
        if numel != len(matrix.keys):
            raise ValueError(f'{matrix.name}: a gate of {numel} elements does not match its slices {matrix.keys}.')
        gates.append((matrix.keys, gate))
    unembed_gate = getattr(module, 'unembed_gate', None)
    if isinstance(unembed_gate, torch.Tensor):
        gates.append((('p',), unembed_gate))
    return gates


def find_monitor(state: State) -> Optional[UpdateRatioMonitor]:
    """The ``UpdateRatioMonitor`` among the run's callbacks, or None."""
    return next((c for c in state.callbacks if isinstance(c, UpdateRatioMonitor)), None)
