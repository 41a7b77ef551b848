"""Composer callbacks of wesar-composer, one per file."""

from wesar_composer.callbacks.loss_spike_counter import LossSpikeCounter
from wesar_composer.callbacks.update_ratio_monitor import UpdateRatioMonitor

__all__ = ['LossSpikeCounter', 'UpdateRatioMonitor']
