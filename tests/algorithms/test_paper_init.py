"""Faithful baselines: Table 1 stds per role and layer (Small and He), embedding scaling, meta init."""

import math

import pytest
import torch
from llmfoundry.utils.builders import build_algorithm

from tests.common import SHAPE_130M, assert_unchanged, llama, mpt, snapshot, table1_std
from wesar_composer import PaperInit, apply_paper_init, apply_wesar
from wesar_composer.algorithms.paper_init import ScaledEmbedding

MATRIX_ROLES = {'e', 'q', 'k', 'v', 'o', 'u', 'd', 'p'}


def matrices_by_role(model):
    """(name, role, layer, weight slice) for every matrix of an MPT or Llama model, by module name."""
    names = {
        'wte': 'e',
        'embed_tokens': 'e',
        'out_proj': 'o',
        'o_proj': 'o',
        'up_proj': 'u',
        'gate_proj': 'g',
        'down_proj': 'd',
        'lm_head': 'p',
        'q_proj': 'q',
        'k_proj': 'k',
        'v_proj': 'v',
    }
    rows = []
    for name, module in model.named_modules():
        leaf = name.rpartition('.')[2]
        layer = next((int(part) for part in name.split('.') if part.isdigit()), None)
        if leaf == 'Wqkv':
            attn = model.get_submodule(name.rpartition('.')[0])
            q = attn.n_heads * attn.head_dim
            kv = attn.kv_n_heads * attn.head_dim
            for role, rows_ in zip('qkv', module.weight.split([q, kv, kv])):
                rows.append((name, role, layer, rows_))
        elif leaf in names:
            rows.append((name, names[leaf], layer, module.weight))
    return rows


def materialize_like_composer(model):
    """What Composer's FSDP does to a meta model: per module, to_empty then obj.param_init_fn(module)."""
    inner = model.model
    for module in inner.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device='cpu', recurse=False)
            inner.param_init_fn(module)


def check_table1(model, d, n, backbone, roles, rel):
    rows = matrices_by_role(model)
    assert {r for _, r, _, _ in rows} == roles
    assert {layer for _, r, layer, _ in rows if r not in ('e', 'p')} == set(range(n))
    for name, role, layer, weight in rows:
        expected = table1_std(role, d, n, backbone)
        assert weight.std().item() == pytest.approx(expected, rel=rel), (name, role, layer)
        assert abs(weight.mean().item()) < 5 * expected / math.sqrt(weight.numel()), (name, role)


@pytest.mark.parametrize('backbone', ['small', 'he'])
def test_table1_stds_per_role_and_layer_on_130m_meta_model(backbone):
    """The paper's 130M shape (d 768, N 12, vocab 32000, untied), built on meta and materialized."""
    model = mpt(**SHAPE_130M, max_seq_len=128, init_device='meta')
    apply_paper_init(model, backbone=backbone)
    assert all(p.is_meta for p in model.parameters())
    materialize_like_composer(model)
    d, n = SHAPE_130M['d_model'], SHAPE_130M['n_layers']
    check_table1(model.model, d, n, backbone, MATRIX_ROLES, rel=0.01)
    norms = [m.weight for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * n + 1 and all(bool((w == 1).all()) for w in norms)  # left to llm-foundry's init

    embedding = model.model.transformer.wte
    assert isinstance(embedding, ScaledEmbedding)
    assert embedding.output_scale == pytest.approx(1 / table1_std('e', d, n, backbone), rel=1e-12)
    tokens = torch.randint(0, SHAPE_130M['vocab_size'], (4, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = embedding(tokens)
    assert out.std().item() == pytest.approx(1.0, rel=0.02)  # embedding scaling: unit variance


def test_cpu_model_is_initialized_in_place_with_nothing_added():
    torch.manual_seed(0)
    model = mpt(d_model=128, n_heads=4, n_layers=4, vocab_size=512)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    apply_paper_init(model, backbone='small')
    assert [id(p) for p in model.parameters()] == params  # same Parameters: an optimizer is unaffected
    assert list(model.state_dict()) == keys
    check_table1(model.model, 128, 4, 'small', MATRIX_ROLES, rel=0.05)
    batch = torch.randint(0, 512, (2, 32))
    loss = model.loss(model({'input_ids': batch}), {'labels': batch})
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(512), rel=0.1)


@pytest.mark.parametrize('backbone', ['small', 'he'])
def test_llama_glu_gqa_model(tmp_path, backbone):
    """hf_causal_lm (Llama: GLU gate projection, GQA): found by role, same Table 1 rules."""
    model = llama(tmp_path, d_model=128, n_heads=4, kv_heads=2, n_layers=4, vocab_size=512)
    apply_paper_init(model, backbone=backbone)
    check_table1(model.model, 128, 4, backbone, MATRIX_ROLES | {'g'}, rel=0.06)
    embedding = model.model.model.embed_tokens
    assert isinstance(embedding, ScaledEmbedding)
    with torch.no_grad():
        out = embedding(torch.arange(512))
    assert out.std().item() == pytest.approx(1.0, rel=0.06)
    assert torch.isfinite(
        model({'input_ids': torch.randint(0, 512, (2, 16)), 'labels': torch.randint(0, 512, (2, 16))}).loss
    )


def test_without_embedding_scaling_the_embedding_stays_plain():
    model = mpt(d_model=64, n_heads=2, n_layers=2, vocab_size=256)
    apply_paper_init(model, backbone='he', embedding_scaling=False)
    assert type(model.model.transformer.wte).__name__ == 'SharedEmbedding'
    assert model.model.transformer.wte.weight.std().item() == pytest.approx(table1_std('e', 64, 2, 'he'), rel=0.05)


def test_algorithm_from_the_registry():
    algorithm = build_algorithm('paper_init', {'backbone': 'he'})
    assert isinstance(algorithm, PaperInit) and algorithm.backbone == 'he'
    assert (
        repr(algorithm)
        == "PaperInit(backbone='he', embedding_scaling=True, role_map=None, init_mode='auto', matrix_lr_sigma_squared=None)"
    )
    assert PaperInit.required_on_load()


def test_bad_backbone_is_refused_before_any_change():
    with pytest.raises(ValueError, match="backbone must be one of \\('he', 'small'\\), got 'xavier'"):
        PaperInit(backbone='xavier')
    model = mpt(d_model=64, n_heads=2, n_layers=2, vocab_size=256)
    before = snapshot(model)
    with pytest.raises(ValueError, match='xavier'):
        apply_paper_init(model, backbone='xavier')
    assert_unchanged(model, before)


def test_applied_twice_or_on_wesar_is_refused():
    model = apply_paper_init(mpt(d_model=64, n_heads=2, n_layers=2, vocab_size=256))
    with pytest.raises(ValueError, match='already applied'):
        apply_paper_init(model)
    with pytest.raises(ValueError, match='paper_init is an alternative to wesar, not an addition'):
        apply_paper_init(apply_wesar(mpt(d_model=64, n_heads=2, n_layers=2, vocab_size=256)))


@pytest.mark.slow
@pytest.mark.parametrize('tied', [False, True])
def test_hf_checkpointer_exports_the_scaling_folded_in(tiny_train_yaml, tmp_path, monkeypatch, tied):
    """llm-foundry's hf_checkpointer on a paper_init run writes a plain MPT with the same logits."""
    from llmfoundry.command_utils import train_from_yaml
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    path = tiny_train_yaml(
        algorithms={'paper_init': {'backbone': 'small'}},
        callbacks={
            'hf_checkpointer': {'save_folder': str(tmp_path / 'hf'), 'save_interval': '2ba', 'precision': 'float32'}
        },
        max_duration='2ba',
        model={'tie_word_embeddings': tied},
    )
    trainer = train_from_yaml(str(path))
    assert isinstance(trainer.state.model.model.transformer.wte, ScaledEmbedding)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf' / 'huggingface' / 'ba2', trust_remote_code=True)
    assert type(plain.transformer.wte).__name__ == 'SharedEmbedding'
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trainer.state.model.eval().model(tokens).logits
        theirs = plain.eval()(tokens).logits
    assert ours.abs().max().item() > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-5
    trainer.close()


def test_backbone_passed_where_the_optimizers_go_is_refused():
    with pytest.raises(ValueError, match='pass hyperparameters by keyword'):
        apply_paper_init(mpt(d_model=64, n_heads=2, n_layers=2, vocab_size=256), 'he')
