"""What the tools read back from a run's local MLflow store."""

from __future__ import annotations

import statistics
from typing import Optional

from wesar_composer.callbacks.keys import LAYER_KEY, matrix_key

__all__ = ['update_ratio_gap']


def update_ratio_gap(tracking_uri: str, run_id: str) -> tuple[Optional[float], Optional[float]]:
    """(mean over layers, last layer) of the median over logged steps of ratio(W_d) / ratio(W_u)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = client.get_run(run_id).data.metrics
    layers = sorted({int(m.group(1)) for k in keys if (m := LAYER_KEY.match(k)) and m.group(2) == 'd'})
    per_layer = []
    for layer in layers:
        d = {m.step: m.value for m in client.get_metric_history(run_id, 'update_ratio/' + matrix_key(layer, 'd'))}
        u = {m.step: m.value for m in client.get_metric_history(run_id, 'update_ratio/' + matrix_key(layer, 'u'))}
        ratios = [d[s] / u[s] for s in sorted(d.keys() & u.keys()) if u[s] > 0]
        if ratios:
            per_layer.append(statistics.median(ratios))
    if not per_layer:
        return None, None
    return statistics.fmean(per_layer), per_layer[-1]
