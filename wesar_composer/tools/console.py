"""What the tools print: ``[tag]`` progress lines, known third-party noise dropped, a run's output sent to a log.

``say`` writes one ``[tag] ...`` line to the console, even while :func:`output_to` sends
llm-foundry's own output (the resolved config, warnings) to a log file. ``quiet_known_noise``
drops the messages of :data:`KNOWN_NOISE`. Standard library only: the console scripts import it
before they know whether they will train.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

__all__ = ['DEFAULT_TAG', 'KNOWN_NOISE', 'DropMessage', 'output_to', 'quiet_known_noise', 'say']

DEFAULT_TAG = 'wesar-demo'  # the [tag] of progress lines; wesar-experiments passes its own
_console = None  # where progress goes while llm-foundry's own output is sent to a log file


def say(line: str, tag: str = DEFAULT_TAG) -> None:
    """Print ``[tag] line`` to the console (not to the log file of a run in progress)."""
    print(f'[{tag}] {line}', file=_console or sys.stdout, flush=True)


# Messages every llm-foundry MPT run prints that say nothing about the run, dropped by logger and text:
# MPT generates (an exported model is tested with generate) though it does not inherit GenerationMixin,
# and llm-foundry's hf RoPE config carries a `factor` that the default RoPE type ignores.
KNOWN_NOISE = {
    'transformers.modeling_utils': "doesn't directly inherit from `GenerationMixin`",
    'transformers.modeling_rope_utils': 'Unrecognized keys in `rope_scaling`',
}


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains ``fragment``."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_known_noise() -> None:
    """Install the filters of :data:`KNOWN_NOISE` (once per process)."""
    for name, fragment in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(DropMessage(fragment))


def _console_handlers() -> list[logging.StreamHandler]:
    """Logging handlers that write to the console (transformers binds its own to stderr at import)."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in ('transformers', 'composer', 'llmfoundry')]
    consoles = {id(sys.__stderr__), id(sys.__stdout__), id(sys.stderr), id(sys.stdout)}
    return [
        h
        for lg in loggers
        for h in lg.handlers
        if isinstance(h, logging.StreamHandler) and id(getattr(h, 'stream', None)) in consoles
    ]


@contextlib.contextmanager
def output_to(log_path: Path):
    """Send stdout, stderr and the console logging handlers to ``log_path``; :func:`say` keeps writing to the console."""
    global _console
    saved = _console
    with open(log_path, 'w') as log_file:
        _console = saved or sys.stdout
        handlers = _console_handlers()
        streams = [h.setStream(log_file) for h in handlers]
        try:
            with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                yield
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)
            _console = saved
