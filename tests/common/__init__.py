"""What the tests share: model builders, token data, training loops, state checks, the tiny train config, and the Table 1 oracle.

Worker scripts launched by ``composer -n 2`` put the repository root on ``sys.path`` and import
from here like the tests do (``from tests.common import mpt``).
"""

from tests.common.datasets import TokenBatches, token_batch
from tests.common.models import APPLY_WITH_SEED, CPU_ATTN, INIT_SEED, SHAPE_130M, llama, llama_config, mpt, mpt_for_init
from tests.common.state import assert_unchanged, snapshot
from tests.common.table1 import BACKBONES, table1_std
from tests.common.train_config import (
    TINY_MAX_CHARS,
    TINY_SEQ_LEN,
    TINY_VOCAB_SIZE,
    tiny_train_config,
    write_train_yaml,
)
from tests.common.training import cpu_trainer, train_losses

__all__ = [
    'APPLY_WITH_SEED',
    'BACKBONES',
    'CPU_ATTN',
    'INIT_SEED',
    'SHAPE_130M',
    'TINY_MAX_CHARS',
    'TINY_SEQ_LEN',
    'TINY_VOCAB_SIZE',
    'TokenBatches',
    'assert_unchanged',
    'cpu_trainer',
    'llama',
    'llama_config',
    'mpt',
    'mpt_for_init',
    'snapshot',
    'table1_std',
    'tiny_train_config',
    'token_batch',
    'train_losses',
    'write_train_yaml',
]
