"""WeSaR through the real llm-foundry training path: train_from_yaml on MDS data, DDP, HF export.

(The registry CLI finds every algorithm: test_algorithms.py.)
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger
from llmfoundry.command_utils import train_from_yaml

from tests.common.callbacks import FIRST_BATCH_LOSS, first_batch_loss, register_first_batch_loss
from wesar_composer import gate_table
from wesar_composer.algorithms.wesar import GatedLinear

pytestmark = pytest.mark.slow  # llm-foundry's train path, and composer -n 2

BIN = Path(sys.executable).parent


def test_train_from_yaml_with_wesar(tiny_train_yaml, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    register_first_batch_loss()
    path = tiny_train_yaml(
        algorithms={'wesar': {'sigma_squared': 4.0e-5}},
        callbacks={FIRST_BATCH_LOSS: {}},
        loggers={'inmemory': {}},
        max_duration='6ba',
    )
    trainer = train_from_yaml(str(path))
    model = trainer.state.model
    gated = [m for m in model.modules() if isinstance(m, GatedLinear)]
    assert len(gated) == 2 * 4 + 1  # Wqkv, out_proj, up_proj, down_proj per layer, lm_head
    assert len(trainer.state.optimizers[0].param_groups) == 2
    assert int(trainer.state.timestamp.batch) == 6
    rows = gate_table(model)
    assert all(abs(r['weight_std'] - 0.0063246) < 0.003 for r in rows)  # W stays near sigma
    loss = trainer.state.loss.item()
    # the untrained model starts above the uniform-prediction loss log(512) = 6.24 (6.84 here); 6 batches get below it
    assert math.isfinite(loss) and loss < math.log(512)
    logged = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)).data
    losses = [float(v) for _, v in logged['loss/train/total']]
    assert len(losses) == 6 and losses[0] > math.log(512) and losses[-1] < losses[0] - 0.5
    seen = first_batch_loss(trainer)  # the same batch under the initial and the trained weights
    assert seen.after < seen.before - 1.0, (seen.before, seen.after)  # 6.84 to 4.88 here


def test_hf_checkpointer_exports_the_merged_model(tiny_train_yaml, tmp_path, monkeypatch):
    """llm-foundry's hf_checkpointer on a WeSaR run writes a plain model with the same logits."""
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    path = tiny_train_yaml(
        algorithms={'wesar': {}},
        callbacks={
            'hf_checkpointer': {'save_folder': str(tmp_path / 'hf'), 'save_interval': '4ba', 'precision': 'float32'}
        },
        max_duration='4ba',
        model={'tie_word_embeddings': True},
    )
    trainer = train_from_yaml(str(path))
    export = tmp_path / 'hf' / 'huggingface' / 'ba4'
    assert (export / 'config.json').exists()
    plain = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    assert not any('gate' in key for key in plain.state_dict())
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model = trainer.state.model.eval()
    with torch.no_grad():
        gated_logits = model.model(tokens).logits
        plain_logits = plain.eval()(tokens).logits
    assert (gated_logits - plain_logits).abs().max().item() <= 1e-5


def test_composer_launches_two_processes_with_ddp(tiny_train_yaml, tmp_path):
    """`composer -n 2 llmfoundry train <yaml>` on CPU: DDP over gloo, WeSaR applied on every rank."""
    path = tiny_train_yaml(
        algorithms={'wesar': {}},
        max_duration='2ba',
        save_folder=str(tmp_path / 'ckpt'),
        save_interval='2ba',
        save_filename='ba{batch}-rank{rank}.pt',
        save_weights_only=True,
        fsdp_config=None,
    )
    env = {**os.environ, 'COMPOSER_DEVICE': 'cpu'}
    out = subprocess.run(
        [
            str(BIN / 'composer'),
            '-n',
            '2',
            '--stdout',
            str(tmp_path / 'rank{rank}.out'),
            str(BIN / 'llmfoundry'),
            'train',
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoints = sorted((tmp_path / 'ckpt').glob('ba2-rank*.pt'))
    assert [c.name for c in checkpoints] == ['ba2-rank0.pt']
    state = torch.load(checkpoints[0], map_location='cpu', weights_only=False)
    model_state = state['state']['model']
    gates = {k: v for k, v in model_state.items() if k.endswith('.gate')}
    assert len(gates) == 2 * 4 + 2  # four per layer, lm_head and the embedding
    metadata = state['state']['metadata']
    assert metadata['world_size'] == 2 and metadata['device_train_microbatch_size'] == 4  # 8 split over 2 ranks
