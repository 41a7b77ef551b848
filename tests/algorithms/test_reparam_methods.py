"""The compared reparameterizations (Table 4 / 6): each method's defining property checked numerically.

Weight Normalization: rows of W_bar have length g, gradient through the normalization, W_bar = W at
init. sigma-Reparam: spectral-norm estimate against torch.linalg, one power iteration per step,
sigma not differentiated, spectral norm 1 at init. Residual scaling: the paper_init function at
init with 1/sqrt(2N) in the forward. All: meta-device init, the update-ratio monitor on the actual
weights, clear errors before any change (fold-back and export: test_algorithms.py, over every algorithm).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from llmfoundry.utils.builders import build_algorithm
from torch import nn

from tests.algorithms.algorithm_settings import SETTINGS
from tests.common import assert_unchanged as assert_state_unchanged
from tests.common import mpt, token_batch
from tests.common import snapshot as state_snapshot
from wesar_composer import (
    ResidualScaling,
    SigmaReparam,
    UpdateRatioMonitor,
    WeightNorm,
    apply_paper_init,
    apply_residual_scaling,
    apply_sigma_reparam,
    apply_weight_norm,
    apply_wesar,
)
from wesar_composer.algorithms.residual_scaling import ResidualScaledLinear
from wesar_composer.algorithms.sigma_reparam import SigmaReparamEmbedding, SigmaReparamLinear, request_power_iteration
from wesar_composer.algorithms.weight_norm import WeightNormEmbedding, WeightNormLinear
from wesar_composer.algorithms.weight_norm.modules import row_norms

TINY = dict(d_model=64, n_heads=4, n_layers=3, vocab_size=256, max_seq_len=32)
APPLY = {key: SETTINGS[key].apply for key in ('weight_norm', 'sigma_reparam', 'residual_scaling')}


def tiny(seed=0, **kwargs):
    return mpt(**{**TINY, **kwargs}, seed=seed)


def logits(model, tokens):
    with torch.no_grad():
        return model.model(tokens).logits


def train_steps(model, optimizer, steps=3):
    model.train()
    for i in range(steps):
        request_power_iteration(model)
        batch = token_batch(seed=i)
        optimizer.zero_grad()
        model.loss(model(batch), batch).backward()
        optimizer.step()


def materialize_like_composer(model):
    """What Composer's FSDP does to a meta model: per module, to_empty then obj.param_init_fn(module)."""
    inner = model.model
    for module in inner.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            module.to_empty(device='cpu', recurse=False)
            inner.param_init_fn(module)


def plain_with(model, state):
    """A fresh plain MPT of the same shape carrying ``state``."""
    plain = tiny(seed=123, tie_word_embeddings=model.model.config.tie_word_embeddings)
    plain.model.load_state_dict(state)
    return plain.eval()


# --- Weight Normalization -------------------------------------------------------------------


def test_weight_norm_is_the_plain_model_at_init():
    """W ~ N(0, sigma^2), g = ||w|| per row: W_bar = W, and the model is the plain one with embedding scaling 1/sigma."""
    sigma = math.sqrt(16e-5)
    model = apply_weight_norm(tiny(), sigma_squared=16e-5)
    modules = [m for m in model.modules() if isinstance(m, (WeightNormLinear, WeightNormEmbedding))]
    assert len(modules) == 2 + 4 * TINY['n_layers']
    for m in modules:
        assert m.weight.std().item() == pytest.approx(sigma, rel=0.06)
        torch.testing.assert_close(m.weight_g, row_norms(m.weight), rtol=1e-6, atol=0)
        torch.testing.assert_close(m.virtual_weight(), m.weight.detach(), rtol=1e-5, atol=1e-8)
    state = {k: v for k, v in model.model.state_dict().items() if not k.endswith('weight_g')}
    state['transformer.wte.weight'] = state['transformer.wte.weight'] / sigma
    tokens = token_batch()['input_ids']
    torch.testing.assert_close(
        logits(model.eval(), tokens), logits(plain_with(model, state), tokens), rtol=1e-4, atol=1e-5
    )


def test_weight_norm_rows_have_length_g_after_training_and_gradients_are_orthogonal():
    model = apply_weight_norm(tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer)
    batch = token_batch(seed=9)
    model.zero_grad()
    model.loss(model(batch), batch).backward()
    for m in model.modules():
        if isinstance(m, (WeightNormLinear, WeightNormEmbedding)):
            assert not torch.allclose(m.weight_g, row_norms(m.weight), rtol=1e-3)  # g and ||v|| have moved apart
            torch.testing.assert_close(row_norms(m.virtual_weight()), m.weight_g.detach().abs(), rtol=1e-5, atol=1e-7)
            # gradient through the normalization: dL/dv is orthogonal to v, row by row
            along = (m.weight.grad * m.weight).sum(dim=1)
            scale = m.weight.grad.norm(dim=1) * m.weight.norm(dim=1)
            assert (along.abs() <= 1e-4 * scale + 1e-12).all()


@pytest.mark.parametrize('tokens', [(3, 5), (4, 10)])  # fewer and more tokens than inputs: both ways of dL/dx
def test_weight_norm_custom_backward_matches_autograd(tokens):
    torch.manual_seed(0)
    fast = WeightNormLinear(24, 18, bias=True, weight_std=0.02)
    fast.reset_parameters()
    with torch.no_grad():
        fast.weight_g.mul_(torch.rand_like(fast.weight_g) + 0.5)
        fast.bias.normal_()
    x = torch.randn(*tokens, 24, requires_grad=True)
    grad_out = torch.randn(*tokens, 18)
    fast(x).backward(grad_out)
    v = fast.weight.detach().clone().requires_grad_()
    g = fast.weight_g.detach().clone().requires_grad_()
    b = fast.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, torch._weight_norm(v, g, 0), b).backward(grad_out)  # torch's own weight norm, plain autograd
    for ours, theirs in (
        (x.grad, x2.grad),
        (fast.weight.grad, v.grad),
        (fast.weight_g.grad, g.grad),
        (fast.bias.grad, b.grad),
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# --- sigma-Reparam --------------------------------------------------------------------------


def slices(module):
    return module.weight.detach().split(list(module.slice_sizes))


def test_sigma_reparam_at_init_every_matrix_has_spectral_norm_one():
    sigma = math.sqrt(64e-5)
    model = apply_sigma_reparam(tiny(), sigma_squared=64e-5)
    modules = [m for m in model.modules() if isinstance(m, (SigmaReparamLinear, SigmaReparamEmbedding))]
    assert len(modules) == 2 + 4 * TINY['n_layers']
    assert [m.slice_sizes for m in modules if m.gate.numel() == 3] == [(64, 64, 64)] * TINY['n_layers']  # q, k, v
    for m in modules:
        assert m.weight.std().item() == pytest.approx(sigma, rel=0.06)
        assert torch.equal(m.gate.detach(), torch.ones_like(m.gate))
        for i, w in enumerate(slices(m)):
            exact = torch.linalg.matrix_norm(w, ord=2)
            assert m.sn_sigma[i].item() == pytest.approx(exact.item(), rel=1e-5)
    for m in modules:
        if isinstance(m, SigmaReparamLinear):
            for w_bar in m.virtual_weight().detach().split(list(m.slice_sizes)):
                assert torch.linalg.matrix_norm(w_bar, ord=2).item() == pytest.approx(1.0, rel=1e-5)
    # embedding scaling: the residual stream starts near unit variance
    embedding = model.model.transformer.wte
    out = embedding(torch.arange(TINY['vocab_size']))
    assert out.std().item() == pytest.approx(1.0, rel=0.1)
    # the forward is the plain model with W / ||W||_2 (embedding times sqrt(V) + sqrt(d))
    state = {}
    for name, m in model.model.named_modules():
        if isinstance(m, SigmaReparamLinear):
            state[f'{name}.weight'] = m.virtual_weight().detach()
        elif isinstance(m, SigmaReparamEmbedding):
            state[f'{name}.weight'] = (
                m.weight.detach()
                / torch.linalg.matrix_norm(m.weight.detach(), ord=2)
                * (math.sqrt(TINY['vocab_size']) + math.sqrt(TINY['d_model']))
            )
    state.update({k: v for k, v in model.model.state_dict().items() if 'norm' in k and k.endswith('weight')})
    tokens = token_batch()['input_ids']
    torch.testing.assert_close(
        logits(model.eval(), tokens), logits(plain_with(model, state), tokens), rtol=1e-4, atol=1e-5
    )


def test_power_iteration_estimate_converges_to_the_spectral_norm_from_below():
    torch.manual_seed(0)
    m = SigmaReparamLinear(48, 96, bias=False, slice_sizes=(32, 32, 32), weight_std=0.03)
    m.reset_parameters()
    exact = torch.stack([torch.linalg.matrix_norm(w, ord=2) for w in slices(m)])
    with torch.no_grad():
        m.sn_u.copy_(torch.randn(96))  # forget the SVD start
    estimates = []
    for _ in range(300):
        m.power_iteration()
        estimates.append(m.sn_sigma.clone())
    estimates = torch.stack(estimates)
    assert (estimates <= exact * (1 + 1e-6)).all()  # ||W v|| with ||v|| = 1 never exceeds ||W||_2
    assert (estimates[1:] >= estimates[:-1] * (1 - 1e-6)).all()  # and never decreases
    assert (estimates[0] < exact * 0.999).any()  # one iteration from a random start is not exact
    torch.testing.assert_close(estimates[-1], exact, rtol=1e-3, atol=0)


def test_sigma_reparam_iterates_once_per_step_and_does_not_differentiate_sigma(monkeypatch):
    model = apply_sigma_reparam(tiny())
    calls = []
    original = SigmaReparamLinear.power_iteration
    monkeypatch.setattr(SigmaReparamLinear, 'power_iteration', lambda self: (calls.append(self), original(self)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        request_power_iteration(model)
        optimizer.zero_grad()
        for micro in range(2):  # gradient accumulation: two forwards, one iteration
            batch = token_batch(seed=10 * step + micro, batch=2)
            model.loss(model(batch), batch).backward()
        optimizer.step()
    linear = [m for m in model.modules() if isinstance(m, SigmaReparamLinear)]
    assert len(calls) == 3 * len(linear)
    model.eval()
    logits(model, token_batch()['input_ids'])
    assert len(calls) == 3 * len(linear)  # eval forwards use the stored estimate

    # dL/dW = a / sigma * dL/dW_bar with sigma a constant, which differs from differentiating sigma = u^T W v
    m = linear[0]
    x = torch.randn(4, m.in_features)
    m.zero_grad()
    m.train()
    (m(x) ** 2).sum().backward()
    w = m.weight.detach().clone().requires_grad_()
    gate = m.gate.detach().clone().requires_grad_()
    w_bar = torch.cat([g / s * ws for g, s, ws in zip(gate, m.sn_sigma, w.split(list(m.slice_sizes)))])
    (F.linear(x, w_bar) ** 2).sum().backward()
    # fp32 rounding relative to the gradients' size (the two orders of products differ in the last bits)
    torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-5, atol=1e-6 * w.grad.abs().max().item())
    torch.testing.assert_close(m.gate.grad, gate.grad, rtol=1e-5, atol=1e-6 * gate.grad.abs().max().item())
    w2 = m.weight.detach().clone().requires_grad_()
    u, v = m.sn_u.split(list(m.slice_sizes)), m.sn_v
    sigma_diff = [ui @ ws @ vi for ui, ws, vi in zip(u, w2.split(list(m.slice_sizes)), v)]
    w_bar2 = torch.cat([g / s * ws for g, s, ws in zip(gate.detach(), sigma_diff, w2.split(list(m.slice_sizes)))])
    (F.linear(x, w_bar2) ** 2).sum().backward()
    assert (w2.grad - m.weight.grad).norm() > 1e-3 * m.weight.grad.norm()


def test_sigma_reparam_on_a_post_ln_decoder():
    """llm-foundry's MPT is pre-LN only; a Hugging Face OPT with do_layer_norm_before=False is post-LN."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        do_layer_norm_before=False,
    )
    model = OPTForCausalLM(config)
    apply_sigma_reparam(model, role_map={r'\.fc1$': 'u', r'\.fc2$': 'd'})
    roles = sorted(
        r for m in model.modules() if isinstance(m, (SigmaReparamLinear, SigmaReparamEmbedding)) for r in m.roles
    )
    assert roles == sorted('e' + 'qkvoud' * 2 + 'p')
    tokens = torch.randint(0, 128, (2, 16))
    request_power_iteration(model)
    out = model(tokens, labels=tokens)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.decoder.layers[0].fc2.gate.grad is not None


# --- Residual scaling -----------------------------------------------------------------------


@pytest.mark.parametrize('backbone', ['small', 'he'])
def test_residual_scaling_is_paper_init_at_init_with_the_scale_in_the_forward(backbone):
    d, n = TINY['d_model'], TINY['n_layers']
    reference = apply_paper_init(tiny(seed=3), backbone=backbone)
    model = apply_residual_scaling(tiny(seed=3), backbone=backbone)
    tokens = token_batch()['input_ids']
    torch.testing.assert_close(logits(model.eval(), tokens), logits(reference.eval(), tokens), rtol=1e-5, atol=2e-6)
    scaled = {n_: m for n_, m in model.model.named_modules() if isinstance(m, ResidualScaledLinear)}
    assert sorted(n_.rpartition('.')[2] for n_ in scaled) == sorted(['out_proj', 'down_proj'] * n)
    expected_std = {
        'small': {'out_proj': math.sqrt(2 / (5 * d)), 'down_proj': math.sqrt(2 / (5 * d))},
        'he': {'out_proj': math.sqrt(1 / d), 'down_proj': math.sqrt(2 / (4 * d))},
    }[backbone]
    for name, m in scaled.items():
        assert m.residual_scale == pytest.approx(1 / math.sqrt(2 * n))
        assert m.weight.std().item() == pytest.approx(expected_std[name.rpartition('.')[2]], rel=0.06)
        x = torch.randn(5, m.in_features)
        torch.testing.assert_close(m(x), F.linear(x, m.weight) / math.sqrt(2 * n))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny().parameters())


# --- All three ------------------------------------------------------------------------------


@pytest.mark.parametrize('method', list(APPLY))
def test_meta_device_init_matches_the_method(method):
    model = tiny(init_device='meta')
    APPLY[method](model)
    assert all(p.is_meta for p in model.parameters())
    materialize_like_composer(model)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        if isinstance(m, (WeightNormLinear, WeightNormEmbedding)):
            assert m.weight.std().item() == pytest.approx(math.sqrt(16e-5), rel=0.06)
            torch.testing.assert_close(m.weight_g, row_norms(m.weight), rtol=1e-6, atol=0)
        elif isinstance(m, (SigmaReparamLinear, SigmaReparamEmbedding)):
            assert m.weight.std().item() == pytest.approx(math.sqrt(64e-5), rel=0.06)
            for i, w in enumerate(slices(m)):
                assert m.sn_sigma[i].item() == pytest.approx(torch.linalg.matrix_norm(w, ord=2).item(), rel=1e-5)
        elif isinstance(m, ResidualScaledLinear):
            assert m.weight.std().item() == pytest.approx(math.sqrt(2 / (5 * TINY['d_model'])), rel=0.06)
    batch = token_batch()
    assert torch.isfinite(model.loss(model(batch), batch))


@pytest.mark.parametrize('method', list(APPLY))
def test_update_ratio_monitor_measures_the_actual_weights(method):
    model = tiny(tie_word_embeddings=method == 'sigma_reparam')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    APPLY[method](model, optimizer)
    monitor = UpdateRatioMonitor(log_interval=1, families='all', layers='all')
    monitor.discover(model)
    monitor.attach(model)
    batch = token_batch()
    request_power_iteration(model)
    optimizer.zero_grad()
    model.loss(model(batch), batch).backward()
    up = model.model.transformer.blocks[1].ffn.down_proj
    before = up.weight.detach().clone()
    monitor.begin_step()
    optimizer.step()
    metrics = monitor.end_step()
    expected = (up.weight.detach() - before).norm() / before.norm()
    assert metrics['update_ratio/L1/d'] == pytest.approx(expected.item(), rel=1e-4)
    assert metrics['param_norm/L1/d'] == pytest.approx(before.norm().item(), rel=1e-5)
    gates = {k for k in metrics if k.startswith('gate/')}
    if method == 'sigma_reparam':  # the scalars a, q/k/v each their own; the tied head's a_p
        assert {'gate/L0/q', 'gate/L0/k', 'gate/L0/v', 'gate/L0/o', 'gate/e', 'gate/p'} <= gates
        assert metrics['gate/L0/q'] == pytest.approx(1.0)
    else:
        assert not gates


# --- Errors ---------------------------------------------------------------------------------

BAD = [
    ('weight_norm', {'sigma_squared': 0}, 'sigma_squared'),
    ('weight_norm', {'sigma_squared': float('nan')}, 'sigma_squared'),
    ('weight_norm', {'sigma_squared': True}, 'sigma_squared'),
    ('weight_norm', {'gain_weight_decay': -1.0}, 'gain_weight_decay'),
    ('weight_norm', {'embedding_scaling': 'yes'}, 'embedding_scaling'),
    ('weight_norm', {'role_map': {r'\.fc1$': 'x'}}, 'role_map'),
    ('sigma_reparam', {'sigma_squared': -6.4e-4}, 'sigma_squared'),
    ('sigma_reparam', {'sigma_squared': '6.4e-4'}, 'sigma_squared'),
    ('sigma_reparam', {'gate_weight_decay': float('inf')}, 'gate_weight_decay'),
    ('sigma_reparam', {'role_map': {'(': 'u'}}, 'regex'),
    ('residual_scaling', {'backbone': 'xavier'}, 'backbone'),
    ('residual_scaling', {'embedding_scaling': 1}, 'embedding_scaling'),
    ('residual_scaling', {'role_map': {r'\.nothing$': 'd'}}, 'match no'),
]
ALGORITHMS = {'weight_norm': WeightNorm, 'sigma_reparam': SigmaReparam, 'residual_scaling': ResidualScaling}


def snapshot(model):
    return [type(m) for m in model.modules()], state_snapshot(model)


def assert_unchanged(model, snap):
    assert [type(m) for m in model.modules()] == snap[0]
    assert_state_unchanged(model, snap[1])


@pytest.mark.parametrize('method,hparams,message', BAD)
def test_bad_hyperparameters_raise_before_the_model_changes(method, hparams, message):
    model = tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        APPLY[method](model, **hparams)
    assert_unchanged(model, snap)
    if 'nothing' not in str(hparams):  # a pattern that matches no module is only known with the model
        with pytest.raises(ValueError, match=message):
            build_algorithm(method, copy.deepcopy(hparams))  # the YAML path: refused when the algorithm is built
        with pytest.raises(ValueError, match=message):
            ALGORITHMS[method](**hparams)


def test_a_hyperparameter_in_the_optimizers_slot_is_refused():
    model = tiny()
    snap = snapshot(model)
    for method in APPLY:
        with pytest.raises(ValueError, match='by keyword'):
            APPLY[method](model, 'he')
    assert_unchanged(model, snap)


@pytest.mark.parametrize('first', ['wesar', 'paper_init', *APPLY])
def test_methods_are_alternatives_not_additions(first):
    apply_first = {'wesar': apply_wesar, 'paper_init': apply_paper_init, **APPLY}[first]
    model = apply_first(tiny())
    snap = snapshot(model)
    for method in APPLY:
        message = 'already applied' if method == first else f'alternative to {first}'
        with pytest.raises(ValueError, match=message):
            APPLY[method](model)
        assert_unchanged(model, snap)


def test_no_matching_matrix_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = type('Config', (), {'d_model': 4, 'n_layers': 1, 'to_dict': lambda self: {}})()
    for method in APPLY:
        with pytest.raises(ValueError, match='role'):
            APPLY[method](model)
