"""The wesar-data tokenizer on an exported model, the rebuild of datasets of an older format,
the clear error when a config points at a dataset not built, and quiet MDS writing in logs."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.common import tiny_train_config, write_train_yaml
from wesar_composer.tools.data import DatasetExistsError, DatasetMissingError, build_dataset, require_dataset
from wesar_composer.tools.data import build as build_lib

PROMPT = 'To be, or not to be, that is the question'


def test_tokenizer_is_a_gpt2_fast_tokenizer_without_token_type_ids(tiny_mds):
    from llmfoundry.utils.builders import build_tokenizer
    from transformers import AutoTokenizer

    config = json.loads((tiny_mds.tokenizer / 'tokenizer_config.json').read_text())
    assert config['tokenizer_class'] == 'GPT2Tokenizer'
    assert config['model_input_names'] == ['input_ids', 'attention_mask']
    for tok in (AutoTokenizer.from_pretrained(str(tiny_mds.tokenizer)), build_tokenizer(str(tiny_mds.tokenizer), {})):
        assert type(tok).__name__ == 'GPT2TokenizerFast'
        assert set(tok(PROMPT, return_tensors='pt')) == {'input_ids', 'attention_mask'}


@pytest.mark.slow
def test_hf_checkpointer_export_generates_with_the_usual_call(tiny_mds, tmp_path, monkeypatch):
    """A tiny llm-foundry run exported by hf_checkpointer: ``model.generate(**tok(text, return_tensors='pt'))``."""
    from llmfoundry.command_utils import train_from_yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    export = tmp_path / 'export'
    cfg = tiny_train_config(
        tiny_mds,
        max_duration='2ba',
        eval_interval='2ba',
        eval_subset_num_batches=1,
        callbacks={'hf_checkpointer': {'save_folder': str(export), 'save_interval': '2ba', 'precision': 'float32'}},
    )
    train_from_yaml(str(write_train_yaml(cfg, tmp_path / 'export.yaml'))).close()
    folder = export / 'huggingface' / 'ba2'
    assert json.loads((folder / 'tokenizer_config.json').read_text())['model_input_names'] == [
        'input_ids',
        'attention_mask',
    ]
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    inputs = tok(PROMPT, return_tensors='pt')
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    n = inputs['input_ids'].shape[1]
    assert out.shape == (1, n + 5)
    assert out[0, :n].tolist() == inputs['input_ids'][0].tolist()


def _make_format_1(root):
    """Turn a built dataset into what wesar-data format 1 wrote: manifest format 1, a PreTrainedTokenizerFast."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(root / 'tokenizer'))
    shutil.rmtree(root / 'tokenizer')
    PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer,
        bos_token=tok.eos_token,
        eos_token=tok.eos_token,
        unk_token=tok.eos_token,
        clean_up_tokenization_spaces=False,
    ).save_pretrained(str(root / 'tokenizer'))
    manifest = json.loads((root / 'manifest.json').read_text())
    manifest['format'] = 1
    (root / 'manifest.json').write_text(json.dumps(manifest))
    assert 'token_type_ids' in AutoTokenizer.from_pretrained(str(root / 'tokenizer'))('x')  # the old fault


def test_a_dataset_of_an_older_format_is_rebuilt_in_place(tiny_mds, tmp_path):
    from transformers import AutoTokenizer

    root = tmp_path / 'data'
    shutil.copytree(tiny_mds.root, root)
    _make_format_1(root)
    settings = tiny_mds.manifest['settings']
    with pytest.raises(
        DatasetMissingError,
        match=r'built by an older wesar-data \(format 1, now 2.*rebuild it with `wesar-data --output-dir',
    ):
        require_dataset(root)
    lines = []
    rebuilt = build_dataset(
        root,
        vocab_size=settings['vocab_size'],
        seq_len=settings['seq_len'],
        max_chars=settings['max_chars'],
        progress=lines.append,
    )
    assert any('built by an older wesar-data (format 1, now 2' in line and 'rebuilding' in line for line in lines)
    assert rebuilt.manifest['format'] == build_lib.MANIFEST_FORMAT == 2
    assert json.loads((root / 'manifest.json').read_text())['format'] == 2
    assert set(AutoTokenizer.from_pretrained(str(root / 'tokenizer'))(PROMPT)) == {'input_ids', 'attention_mask'}
    assert rebuilt.manifest['stats'] == tiny_mds.manifest['stats']  # same corpus, same tokens
    assert [p.name for p in tmp_path.iterdir()] == ['data']  # nothing left beside it
    assert require_dataset(root).manifest == rebuilt.manifest


def test_an_older_dataset_of_other_settings_is_refused_and_kept(tiny_mds, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(tiny_mds.root, root)
    _make_format_1(root)
    settings = tiny_mds.manifest['settings']
    with pytest.raises(DatasetExistsError, match='other settings'):
        build_dataset(
            root,
            vocab_size=settings['vocab_size'] * 2,
            seq_len=settings['seq_len'],
            max_chars=settings['max_chars'],
            progress=lambda line: None,
        )
    assert json.loads((root / 'manifest.json').read_text())['format'] == 1


def test_a_missing_dataset_names_the_folder_and_the_command(tmp_path):
    with pytest.raises(
        DatasetMissingError,
        match=rf"Dataset folder '{tmp_path}/nope' does not exist. Build it first "
        rf'with `wesar-data --output-dir {tmp_path}/nope --vocab-size 512 --seq-len 64`',
    ):
        require_dataset(tmp_path / 'nope', 512, 64)
    (tmp_path / 'half').mkdir()
    with pytest.raises(DatasetMissingError, match=r'holds no manifest.json .*`wesar-data --output-dir .*/half`,'):
        require_dataset(tmp_path / 'half', 4096, 128)  # the defaults need no flags


def test_config_check_leaves_other_configs_alone(tmp_path):
    other = {'variables': {'data_root': str(tmp_path / 'nope')}, 'tokenizer': {'name': 'EleutherAI/gpt-neox-20b'}}
    assert build_lib.check_train_config(other) is other
    assert build_lib.check_train_config({'tokenizer': {'name': str(tmp_path / 'tok')}})
    with pytest.raises(DatasetMissingError):
        build_lib.check_train_config(
            {
                'variables': {'data_root': str(tmp_path / 'nope')},
                'tokenizer': {'name': str(tmp_path / 'nope' / 'tokenizer')},
            }
        )


def test_the_demo_yaml_on_a_missing_dataset_stops_before_any_work(tmp_path, monkeypatch):
    """llm-foundry's train path on the demo YAML: the dataset error, not Hugging Face's repo-id error."""
    from llmfoundry.command_utils import train

    from wesar_composer.tools import demo

    monkeypatch.chdir(tmp_path)  # the check is the package's config transform entry point: any working folder
    store = tmp_path / 'mlruns'
    cfg = demo.load_config(
        demo.find_demo_yaml(), [f'variables.data_root={tmp_path}/nope', f'variables.mlflow_tracking_uri={store}']
    )
    with pytest.raises(
        DatasetMissingError, match=rf"'{tmp_path}/nope' does not exist.*`wesar-data --output-dir {tmp_path}/nope`"
    ):
        train(cfg)
    assert not store.exists()  # no MLflow run was started


def test_mds_writing_prints_no_progress_bar_into_a_log(tiny_mds, tmp_path, capfd):
    capfd.readouterr()
    build_lib._convert_to_mds(tiny_mds.text / 'val', tmp_path / 'mds', tiny_mds.tokenizer, tiny_mds.seq_len)
    assert (tmp_path / 'mds' / 'index.json').is_file()
    err = capfd.readouterr().err
    assert 'it/s' not in err and '\r' not in err, err[:300]
