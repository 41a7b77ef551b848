"""Offline data for the demo and the tests: corpus, tokenizer and MDS shards, built locally."""

from wesar_composer.tools.data.build import (
    DEFAULT_SEQ_LEN,
    DEFAULT_VOCAB_SIZE,
    DatasetExistsError,
    DatasetMissingError,
    DatasetPaths,
    build_dataset,
    default_output_dir,
    require_dataset,
)
from wesar_composer.tools.data.corpus import CorpusSourceError

__all__ = [
    'DEFAULT_SEQ_LEN',
    'DEFAULT_VOCAB_SIZE',
    'CorpusSourceError',
    'DatasetExistsError',
    'DatasetMissingError',
    'DatasetPaths',
    'build_dataset',
    'default_output_dir',
    'require_dataset',
]
