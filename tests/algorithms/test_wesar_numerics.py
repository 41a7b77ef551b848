"""Numerical properties: Adam invariance (Section 4.2), merge equivalence, meta-device init."""

import math

import pytest
import torch

from tests.common import llama, mpt
from wesar_composer import apply_wesar, gate_table, merge_gates
from wesar_composer.algorithms.wesar import GatedEmbedding, GatedLinear


def batch(vocab=512, seed=0, size=(4, 32)):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, size, generator=generator)
    return {'input_ids': tokens, 'labels': tokens.clone(), 'attention_mask': torch.ones_like(tokens)}


def train_steps(model, steps=3, lr=1e-3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        model.loss(model(batch(seed=step)), batch(seed=step)).backward()
        optimizer.step()


def gated_linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, GatedLinear)}


def update_of_w(model, make_optimizer, steps=3):
    """The update of every gated W after ``steps`` steps on one batch, W restored after each step.

    Restoring W keeps the virtual weights, hence dL/dW_bar, the same at every step, while the
    optimizer's state accumulates as in training.
    """
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    start = {name: m.weight.detach().clone() for name, m in gated_linears(model).items()}
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(model(batch()), batch()).backward()
        optimizer.step()
        with torch.no_grad():
            update = {name: m.weight - start[name] for name, m in gated_linears(model).items()}
            for name, m in gated_linears(model).items():
                m.weight.copy_(start[name])
    return update


@pytest.mark.parametrize('optimizer_name, invariant', [('adam', True), ('sgd', False)])
def test_adam_update_of_w_does_not_depend_on_the_gate(optimizer_name, invariant):
    """dL/dW = a dL/dW_bar, and Adam's M / sqrt(V) cancels a: same data, same update of W.

    SGD is the control: its update of W scales with a, so the same comparison fails.
    """
    model = apply_wesar(mpt(n_layers=2, seed=1), trainable_gates=False)
    twin = apply_wesar(mpt(n_layers=2, seed=1), trainable_gates=False)
    with torch.no_grad():  # gates x c and W / c per matrix: the same virtual weights
        for i, module in enumerate(gated_linears(twin).values()):
            factor = 0.25 + 0.5 * i  # 0.25x to ~6x
            module.gate.mul_(factor)
            module.weight.div_(factor)
    assert torch.allclose(model(batch()).logits, twin(batch()).logits, atol=1e-4)

    if optimizer_name == 'adam':

        def make(params):
            return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-12)
    else:

        def make(params):
            return torch.optim.SGD(params, lr=1e-3)

    ours, theirs = update_of_w(model, make), update_of_w(twin, make)
    for name in ours:
        relative_difference = ((ours[name] - theirs[name]).norm() / ours[name].norm()).item()
        if invariant:
            assert relative_difference < 1e-3, name  # float rounding of the forward only
        else:
            assert relative_difference > 0.1, name


def test_trained_gates_merge_into_plain_mpt_with_same_logits():
    model = apply_wesar(mpt(n_layers=2))
    initial_gates = [row['gate'] for row in gate_table(model)]
    train_steps(model)
    moved = [abs(row['gate'] - g) for row, g in zip(gate_table(model), initial_gates)]
    assert min(moved) > 1e-5  # every gate trained away from its initial value
    x = batch(seed=9)
    gated = model(x).logits.detach()
    merge_gates(model)
    plain = model(x).logits.detach()
    assert (gated - plain).abs().max().item() <= 1e-5
    reference = mpt(n_layers=2)  # the ungated model of the same config
    assert list(model.state_dict().keys()) == list(reference.state_dict().keys())
    assert not any(isinstance(m, (GatedLinear, GatedEmbedding)) for m in model.modules())


def test_tied_mpt_merges_head_gate_into_logit_scale():
    model = apply_wesar(mpt(n_layers=2, tie_word_embeddings=True))
    train_steps(model)
    x = batch(seed=9)
    gated = model(x).logits.detach()
    merge_gates(model)
    assert model.model.config.logit_scale == pytest.approx(model.model.logit_scale)
    assert (gated - model(x).logits.detach()).abs().max().item() <= 1e-5
    assert list(model.state_dict().keys()) == list(mpt(n_layers=2, tie_word_embeddings=True).state_dict().keys())


@pytest.mark.parametrize('tie', [False, True])
def test_llama_merges_with_same_logits(tmp_path, tie):
    model = apply_wesar(llama(tmp_path, n_layers=2, tie=tie))
    train_steps(model)
    x = batch(seed=9)
    gated = model(x).logits.detach()
    merge_gates(model)
    assert (gated - model(x).logits.detach()).abs().max().item() <= 1e-5
    assert model.model.config.tie_word_embeddings is False


def test_meta_device_model_materializes_with_wesar_init():
    """Composer's FSDP materializes a meta model module by module: to_empty, then param_init_fn."""
    model = mpt(d_model=256, n_layers=4, init_device='meta', vocab_size=1024)
    assert all(p.is_meta for p in model.parameters())
    apply_wesar(model)
    owner = model.model  # MPTForCausalLM: the object whose param_init_fn Composer calls
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device='cpu', recurse=False)
            with torch.no_grad():  # garbage left by to_empty must be overwritten
                for p in module.parameters(recurse=False):
                    p.fill_(123.0)
            owner.param_init_fn(module)
    rows = gate_table(model)
    sigma = math.sqrt(4e-5)
    for row in rows:
        assert row['weight_std'] == pytest.approx(sigma, rel=0.05), row
    reference = {(r['name']): r['gate'] for r in gate_table(apply_wesar(mpt(d_model=256, n_layers=4, vocab_size=1024)))}
    assert {r['name']: r['gate'] for r in rows} == pytest.approx(reference)
    norms = [m.weight for m in model.modules() if type(m).__name__ == 'RMSNorm']
    assert all(torch.all(w == 1.0) for w in norms)  # other modules keep llm-foundry's init


# (tokens, d_in, d_out): the output, the input and the weight are in turn the smallest operand to scale
@pytest.mark.parametrize('tokens, d_in, d_out', [((2, 3), 8, 6), ((2, 3), 4, 8), ((4, 5), 4, 6)])
@pytest.mark.parametrize('split', ['one', 'halves', 'rows'])
@pytest.mark.parametrize('bias', [True, False])
def test_gated_linear_backward_matches_autograd(tokens, d_in, d_out, split, bias):
    """The custom backward (the scale on the smallest operand, dot products for the gates) against finite differences."""
    from wesar_composer.reparam.modules import ScaledLinearFunction

    slices = {'one': (d_out,), 'halves': (d_out // 2, d_out - d_out // 2), 'rows': (1,) * d_out}[split]
    generator = torch.Generator().manual_seed(d_out + len(slices))

    def make(*shape):
        return torch.randn(*shape, dtype=torch.double, generator=generator).requires_grad_()

    inputs = (make(*tokens, d_in), make(d_out, d_in), make(len(slices)), make(d_out) if bias else None, slices)
    assert torch.autograd.gradcheck(ScaledLinearFunction.apply, inputs)


@pytest.mark.parametrize('tokens, d_in, d_out', [((2, 3), 8, 6), ((2, 3), 4, 8), ((4, 16), 8, 6)])
@pytest.mark.parametrize('split', ['one', 'two'])
def test_gated_linear_under_autocast_matches_autograd(tokens, d_in, d_out, split):
    """Under bf16 autocast (the scaled bf16 copy of W kept for backward when W is smallest): the output and every
    gradient as plain autograd on the same bf16 operands gives them."""
    from wesar_composer.reparam.modules import ScaledLinearFunction, expand_rows

    slices = (d_out,) if split == 'one' else (2, d_out - 2)
    generator = torch.Generator().manual_seed(d_in * d_out)
    x = torch.randn(*tokens, d_in, generator=generator)
    weight = torch.randn(d_out, d_in, generator=generator)
    scales = torch.rand(len(slices), generator=generator) + 0.5
    upstream = torch.randn(*tokens, d_out, generator=generator).bfloat16()
    grads = []
    for reference in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, weight, scales)]
        with torch.autocast('cpu', dtype=torch.bfloat16):
            if reference:
                scaled = leaves[1].bfloat16() * expand_rows(leaves[2], slices).bfloat16()
                y = torch.nn.functional.linear(leaves[0], scaled)
            else:
                y = ScaledLinearFunction.apply(leaves[0], leaves[1], leaves[2], None, slices)
        assert y.dtype == torch.bfloat16
        (y.float() * upstream.float()).sum().backward()
        grads.append([y.float(), *(t.grad.float() for t in leaves)])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_tied_head_gradients_match_plain_autograd():
    """The tied head (a_p * W_e) runs through the scaled product: same logits and gradients as forming a_p * W_e."""
    torch.manual_seed(0)
    emb = GatedEmbedding(50, 16, unembed_gate_init=3.0, weight_std=0.02)
    with torch.no_grad():
        emb.weight.normal_(0, 0.02)
    h = torch.randn(2, 7, 16, dtype=torch.float32)
    upstream = torch.randn(2, 7, 50)
    (emb(h, unembed=True) * upstream).sum().backward()
    got = (emb.weight.grad.clone(), emb.unembed_gate.grad.clone())
    weight = emb.weight.detach().clone().requires_grad_()
    gate = emb.unembed_gate.detach().clone().requires_grad_()
    (torch.nn.functional.linear(h, weight * gate) * upstream).sum().backward()
    torch.testing.assert_close(got[0], weight.grad)
    torch.testing.assert_close(got[1], gate.grad)


@pytest.mark.parametrize('autocast', [False, True])
def test_gated_linear_compiles_in_one_graph(autocast):
    """torch.compile(fullgraph=True) traces the scaled product, forward and backward (AOTAutograd), with no graph
    break, under bf16 autocast too; the compiled gradients equal the eager ones."""
    torch.manual_seed(0)
    layer = GatedLinear(16, 12, bias=False, gate_init=[2.0, 3.0], slice_sizes=(4, 8), weight_std=0.1)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
    x = torch.randn(3, 5, 16)
    results = []
    for compiled in (False, True):
        fn = (
            (lambda x: layer(x).float().sum())
            if not compiled
            else torch.compile(lambda x: layer(x).float().sum(), fullgraph=True, backend='aot_eager')
        )
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = fn(x)
        out.backward()
        results.append((out.detach(), layer.weight.grad.clone(), layer.gate.grad.clone()))
        layer.zero_grad()
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_gated_linear_under_activation_checkpointing():
    """torch.utils.checkpoint recomputes the scaled product in backward: the same gradients as without it."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = GatedLinear(16, 12, bias=True, gate_init=[2.0, 3.0], slice_sizes=(4, 8), weight_std=0.1)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
    x = torch.randn(3, 5, 16, requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        (out.tanh().sum()).backward()
        grads.append([t.grad.clone() for t in (x, layer.weight, layer.gate, layer.bias)])
        for t in (x, layer.weight, layer.gate, layer.bias):
            t.grad = None
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)
