"""Pretrained weights: refused by default, discarded only when asked, preserved by WeSaR's function-preserving mode."""

import pytest
import torch
from llmfoundry.models.hf import ComposerHFCausalLM
from transformers import LlamaForCausalLM

from tests.common import APPLY_WITH_SEED, assert_unchanged, llama_config, snapshot
from wesar_composer import WeSaR, apply_wesar, gate_table, merge_gates
from wesar_composer.algorithms.wesar import GatedEmbedding, GatedLinear


@pytest.fixture(scope='module')
def saved_llama(tmp_path_factory):
    """A Llama-style model (GQA, GLU) with trained-looking weights: stds that differ by matrix."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(d_model=64, n_heads=4, kv_heads=2, n_layers=2, max_positions=64))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.dim() == 2:
                p.mul_(0.5 + 0.37 * i)  # no init looks like this
    path = tmp_path_factory.mktemp('llama') / 'pretrained'
    model.save_pretrained(path)
    return path


def load(path, pretrained=True):
    return ComposerHFCausalLM(
        tokenizer=None, pretrained_model_name_or_path=str(path), pretrained=pretrained, use_train_metrics=False
    )


def logits(model, tokens):
    with torch.no_grad():
        return model.model(tokens).logits


TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('method', list(APPLY_WITH_SEED))
def test_every_algorithm_refuses_pretrained_weights_by_default(saved_llama, method):
    model = load(saved_llama)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f'{method}: the model holds pretrained weights .*LlamaForCausalLM'):
        APPLY_WITH_SEED[method](model)
    assert_unchanged(model, before)


def test_a_model_built_from_its_config_is_not_taken_for_a_pretrained_one(saved_llama):
    apply_wesar(load(saved_llama, pretrained=False))  # no error


def test_reinit_discards_the_pretrained_weights_and_says_so(saved_llama, caplog):
    model = load(saved_llama)
    reference = logits(model, TOKENS)
    apply_wesar(model, init_mode='reinit')
    assert 'discards the pretrained weights' in caplog.text
    assert (logits(model, TOKENS) - reference).abs().max() > 1.0


def test_preserve_keeps_the_logits_and_puts_every_weight_at_sigma(saved_llama):
    model = load(saved_llama)
    trained = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    reference = logits(model, TOKENS)
    apply_wesar(model, init_mode='preserve', sigma_squared=4e-5)
    torch.testing.assert_close(logits(model, TOKENS), reference, rtol=1e-5, atol=1e-5)
    rows = gate_table(model)
    assert len(rows) == 1 + 2 * 7 + 1  # e, q k v o g u d per layer, p
    for row in rows:
        assert row['weight_std'] == pytest.approx(4e-5**0.5, rel=1e-4), row['name']
    q = model.model.model.layers[1].self_attn.q_proj
    assert q.gate.item() == pytest.approx(
        trained['model.layers.1.self_attn.q_proj.weight'].std().item() / 4e-5**0.5, rel=1e-5
    )
    merged = merge_gates(model)  # and back: the merged weights are the trained ones
    for name, param in merged.model.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=1e-5, atol=1e-7)


def test_preserve_on_a_tied_mpt_keeps_the_logits():
    from tests.common import mpt

    model = mpt(n_layers=2, kv_n_heads=2, tie_word_embeddings=True)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.dim() == 2:
                p.mul_(1 + 0.3 * i)
    model.model.eval()  # as from_pretrained leaves it
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = logits(model, tokens)
    apply_wesar(model, init_mode='preserve')
    wte = model.model.transformer.wte
    assert isinstance(wte, GatedEmbedding) and wte.unembed_gate is not None
    assert isinstance(model.model.transformer.blocks[0].attn.Wqkv, GatedLinear)
    scale = reference.abs().max().item()  # fp32 rounding of W * sigma / std, times the gate: relative to the logits
    torch.testing.assert_close(logits(model, tokens), reference, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.slow
def test_train_from_yaml_with_pretrained_weights(saved_llama, tiny_train_cfg, tmp_path, monkeypatch):
    """hf_causal_lm with pretrained: true: wesar refuses; init_mode: preserve starts from the pretrained loss."""
    from llmfoundry.command_utils import train_from_yaml

    from tests.common import write_train_yaml

    monkeypatch.chdir(tmp_path)
    model = {
        'name': 'hf_causal_lm',
        'pretrained_model_name_or_path': str(saved_llama),
        'pretrained': True,
        'use_train_metrics': False,
    }

    def yaml_for(hparams, name):
        cfg = tiny_train_cfg(
            algorithms={} if hparams is None else {'wesar': hparams}, max_duration='1ba', eval_interval='1ba'
        )
        cfg['model'] = model
        return write_train_yaml(cfg, tmp_path / f'{name}.yaml')

    with pytest.raises(ValueError, match='wesar: the model holds pretrained weights'):
        train_from_yaml(str(yaml_for({}, 'refused')))
    trainer = train_from_yaml(str(yaml_for({'init_mode': 'preserve'}, 'preserve')))
    assert any(isinstance(m, GatedLinear) for m in trainer.state.model.modules())
    plain = train_from_yaml(str(yaml_for(None, 'plain')))  # the pretrained model, no algorithm
    assert not any(isinstance(m, GatedLinear) for m in plain.state.model.modules())
    assert trainer.state.loss.item() == pytest.approx(plain.state.loss.item(), rel=1e-5)  # the first batch's loss


def test_init_mode_is_checked():
    with pytest.raises(ValueError, match=r"init_mode must be one of \('auto', 'reinit', 'preserve'\), got 'keep'"):
        WeSaR(init_mode='keep')
