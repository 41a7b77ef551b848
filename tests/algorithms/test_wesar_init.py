"""Table 1: WeSaR's initialization per role and layer, on the paper's 130M shape."""

import math

import pytest
import torch

from tests.common import SHAPE_130M, assert_unchanged, llama, mpt, snapshot
from tests.common import table1_std as paper_table1_std
from wesar_composer import apply_wesar, gate_table, merge_gates
from wesar_composer.algorithms.wesar.wesar import GATED_MODULES

SIGMA_SQUARED = 4e-5
SIGMA = math.sqrt(SIGMA_SQUARED)
ROLES_MHA = {'e', 'q', 'k', 'v', 'o', 'u', 'd', 'p'}


def table1_std(role: str, d: int, n: int, backbone: str) -> float:
    """Virtual std of Table 1 (the oracle of tests/common); e is sigma under embedding scaling."""
    return SIGMA if role == 'e' else paper_table1_std(role, d, n, backbone)


def check_table1(rows, d, n, backbone, expected_roles):
    assert {r['role'] for r in rows} == expected_roles
    layers = {r['layer'] for r in rows if r['role'] not in ('e', 'p')}
    assert layers == set(range(n))
    for row in rows:
        expected = table1_std(row['role'], d, n, backbone)
        gate = 1.0 if row['role'] == 'e' else expected / SIGMA
        assert row['gate'] == pytest.approx(gate, rel=1e-6), row
        assert row['weight_std'] == pytest.approx(SIGMA, rel=0.03), row
        assert row['virtual_std'] == pytest.approx(expected, rel=0.03), row


@pytest.fixture(scope='module')
def mpt_130m():
    return mpt(**SHAPE_130M, max_seq_len=128)


@pytest.mark.parametrize('backbone', ['he', 'small'])
def test_table1_on_130m_mpt(mpt_130m, backbone):
    model = apply_wesar(mpt_130m, sigma_squared=SIGMA_SQUARED, backbone=backbone)
    rows = gate_table(model)
    assert len(rows) == 2 + 6 * 12  # e, p, and q k v o u d in each of the 12 layers
    check_table1(rows, d=768, n=12, backbone=backbone, expected_roles=ROLES_MHA)
    merge_gates(model)  # undo for the next backbone
    assert not any(isinstance(m, GATED_MODULES) for m in model.modules())


def test_embedding_scaling_gives_unit_variance_residual_stream():
    model = apply_wesar(mpt(d_model=256, vocab_size=4096))
    tokens = torch.randint(0, 4096, (4, 64))
    out = model.model.transformer.wte(tokens)
    assert out.std().item() == pytest.approx(1.0, rel=0.05)
    plain = mpt(d_model=256, vocab_size=4096)
    apply_wesar(plain, embedding_scaling=False)
    # without scaling the gate carries the backbone's embedding std sqrt(1/d)
    assert plain.model.transformer.wte(tokens).std().item() == pytest.approx(
        paper_table1_std('e', 256, 4, 'he'), rel=0.05
    )


@pytest.mark.parametrize('backbone', ['he', 'small'])
def test_table1_on_llama_with_glu_and_gqa(tmp_path, backbone):
    model = apply_wesar(
        llama(tmp_path, d_model=256, n_heads=8, kv_heads=2, n_layers=4, vocab_size=2048), backbone=backbone
    )
    rows = gate_table(model)
    check_table1(rows, d=256, n=4, backbone=backbone, expected_roles=ROLES_MHA | {'g'})
    k_proj = model.model.model.layers[0].self_attn.k_proj
    assert k_proj.weight.shape == (64, 256)  # GQA: k narrower than q


def test_fused_qkv_gets_one_gate_per_slice_with_gqa_widths():
    model = apply_wesar(mpt(d_model=128, n_heads=8, kv_n_heads=2, ffn_type='mptglu'))
    wqkv = model.model.transformer.blocks[0].attn.Wqkv
    assert wqkv.slice_sizes == (128, 32, 32)
    assert wqkv.gate.numel() == 3
    rows = [r for r in gate_table(model) if r['layer'] == 0]
    assert [r['role'] for r in rows] == ['q', 'k', 'v', 'o', 'u', 'd', 'g']
    check_table1(gate_table(model), d=128, n=4, backbone='he', expected_roles=ROLES_MHA | {'g'})


def test_tied_embedding_has_separate_e_and_p_gates():
    model = apply_wesar(mpt(tie_word_embeddings=True))
    rows = {r['role']: r for r in gate_table(model) if r['role'] in ('e', 'p')}
    assert rows['e']['gate'] == pytest.approx(1.0)
    assert rows['p']['gate'] == pytest.approx(table1_std('p', 128, 4, 'he') / SIGMA, rel=1e-6)
    wte = model.model.transformer.wte
    assert wte.gate is not wte.unembed_gate


def test_virtual_weights_match_backbone_stds_at_init_under_seed():
    """Same seed, same model: WeSaR re-initializes every W with the common sigma."""
    a = apply_wesar(mpt(seed=3))
    b = apply_wesar(mpt(seed=3))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_sigma_reference_width_scales_sigma_with_the_width():
    """sigma^2 = sigma_squared * reference / d: at d 64 with 4e-5 at 2048, sigma^2 = 1.28e-3; a * W keeps Table 1."""
    d, n = 64, 2
    model = apply_wesar(mpt(d_model=d, n_layers=n, seed=1), sigma_reference_width=2048, seed=0)
    sigma = math.sqrt(4e-5 * 2048 / d)
    rows = gate_table(model)
    for row in rows:
        assert row['weight_std'] == pytest.approx(sigma, rel=0.05), row
        if row['role'] != 'e':
            expected = paper_table1_std(row['role'], d, n, 'he')
            assert row['gate'] == pytest.approx(expected / sigma, rel=1e-6), row
    same = apply_wesar(mpt(d_model=2048 // 16, n_heads=4, n_layers=n, seed=1), sigma_reference_width=128, seed=0)
    assert all(r['weight_std'] == pytest.approx(SIGMA, rel=0.05) for r in gate_table(same))  # at the reference: 4e-5


@pytest.mark.parametrize('bad', [0, -5, 2.5, True, '2048'])
def test_sigma_reference_width_refuses_bad_values(bad):
    from wesar_composer import WeSaR

    model = mpt(n_layers=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f'sigma_reference_width must be a positive integer.*got {bad!r}'):
        apply_wesar(model, sigma_reference_width=bad)
    with pytest.raises(ValueError, match='sigma_reference_width'):
        WeSaR(sigma_reference_width=bad)
    assert_unchanged(model, before)
