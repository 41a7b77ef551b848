"""Separate ranges of streaming's shared-memory names for processes that open datasets at once.

mosaicml-streaming names a dataset's shared memory by the first free number, counting from 0
and skipping every number whose file lock is left in the temp folder (it never removes those).
Two processes that open datasets at the same moment can pick the same number; the second one
fails with ``FileExistsError``. Under ``pytest -n 2`` the two test workers and the ``composer -n 2``
launches of their tests therefore count from ranges of their own.
"""

from __future__ import annotations

import itertools
import os

ENV = 'WESAR_TESTS_STREAMING_NAMES_FROM'  # read by worker scripts launched with composer -n 2
LAUNCHES_FROM = 300_000  # test_fsdp2_train's launches; llmfoundry's own CLI keeps streaming's range (from 0)


def count_names_from(start: int) -> None:
    """Make this process's streaming datasets take shared-memory numbers from ``start`` up."""
    from streaming.base.shared import prefix

    prefix._each_prefix_int = lambda: itertools.count(start)  # type: ignore[attr-defined]


def count_names_from_env() -> None:
    """In a launched worker: the range its test asked for in ``ENV``, if any."""
    if os.environ.get(ENV):
        count_names_from(int(os.environ[ENV]))
