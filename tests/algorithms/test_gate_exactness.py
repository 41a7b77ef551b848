"""The gate under autocast and bf16 parameters: exactly F.linear(x, a * W), and what it moves.

The reference of every test is plain autograd of ``F.linear(x, a * W, b)`` under the same
autocast: (a * W) rounded once to bf16. y, dL/dx, dL/dW and dL/db must equal it bitwise; dL/da
must be within 1e-5 (relative) of the float64 dot product <dL/dW_bar, W> per slice.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.common import mpt
from wesar_composer import apply_wesar
from wesar_composer.algorithms.wesar import GatedEmbedding, GatedLinear
from wesar_composer.algorithms.wesar.modules import refresh_nonzero_gates
from wesar_composer.reparam.modules import ScaledLinearFunction, expand_rows

SLICES = {'one': (12,), 'gqa': (8, 2, 2)}  # a plain projection; fused q, k, v with GQA widths


def _reference(x, weight, scales, bias, slices, upstream, dtype):
    """y and the leaves' gradients by plain autograd of F.linear(x, a * W, b); dL/dW_bar kept."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, scales, bias)]
    with torch.autocast('cpu', dtype=dtype):
        virtual = leaves[1] * expand_rows(leaves[2], slices)
        virtual.retain_grad()
        y = F.linear(leaves[0], virtual, leaves[3])
    (y.float() * upstream).sum().backward()
    return y, leaves, virtual.grad


def _ours(x, weight, scales, bias, slices, upstream, dtype, nonzero):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, scales, bias)]
    with torch.autocast('cpu', dtype=dtype):
        y = ScaledLinearFunction.apply(leaves[0], leaves[1], leaves[2], leaves[3], slices, nonzero)
    (y.float() * upstream).sum().backward()
    return y, leaves


def _gate_grad_float64(grad_virtual, weight, slices):
    return torch.stack(
        [(g.double() * w.double()).sum() for g, w in zip(grad_virtual.split(list(slices)), weight.split(list(slices)))]
    )


@pytest.mark.parametrize('slices', ['one', 'gqa'])
@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('gates', ['positive', 'negative', 'zero'])
@pytest.mark.parametrize('nonzero', [False, True])
def test_autocast_equals_f_linear_of_a_times_w(slices, bias, gates, nonzero):
    if gates == 'zero' and nonzero:
        pytest.skip('a zero gate is never flagged nonzero (the stale-flag case is tested below)')
    sizes = SLICES[slices]
    generator = torch.Generator().manual_seed(len(sizes) * 10 + bias)
    x = torch.randn(3, 5, 16, generator=generator)  # 3-D x
    weight = torch.randn(12, 16, generator=generator) * 0.02
    scales = {'positive': 0.5 + torch.rand(len(sizes), generator=generator) * 20, 'zero': torch.zeros(len(sizes))}
    scales['negative'] = -scales['positive']
    scales = scales[gates]
    b = torch.randn(12, generator=generator) if bias else None
    upstream = torch.randn(3, 5, 12, generator=generator)
    y_ref, ref, grad_virtual = _reference(x, weight, scales, b, sizes, upstream, torch.bfloat16)
    y, ours = _ours(x, weight, scales, b, sizes, upstream, torch.bfloat16, nonzero)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    assert torch.equal(ours[0].grad, ref[0].grad)  # dL/dx
    assert torch.equal(ours[1].grad, ref[1].grad)  # dL/dW = a * dL/dW_bar
    if bias:
        assert torch.equal(ours[3].grad, ref[3].grad)
    expected = _gate_grad_float64(grad_virtual, weight, sizes)
    torch.testing.assert_close(ours[2].grad.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_scaled_copy_is_rounded_once():
    """bf16(a * W), not bf16(bf16(a) * bf16(W)): the gate is not rounded before it scales W."""
    weight = torch.full((4, 4), 1.0 + 2**-9)  # rounds to 1.0 in bf16 (8 significant bits)
    scales = torch.tensor([1.0 + 2**-8 - 2**-12])  # rounds to 1.0 too; a * W rounds up to 1 + 2^-7
    eye = torch.eye(4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = ScaledLinearFunction.apply(eye, weight, scales, None, (4,), True)
        y_ref = F.linear(eye, weight * scales)
    assert torch.equal(y, y_ref)
    assert y[0, 0].item() != (weight.bfloat16() * scales.bfloat16())[0, 0].item()


def test_stale_nonzero_flag_gives_nan_not_a_wrong_gradient():
    x, weight = torch.randn(2, 8), torch.randn(6, 8)
    scales = torch.zeros(1, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = ScaledLinearFunction.apply(x, weight.requires_grad_(), scales, None, (6,), True)
    y.float().sum().backward()
    assert torch.isnan(scales.grad).all()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize('nonzero', [False, True])
def test_bf16_parameters_equal_f_linear_of_a_times_w(nonzero):
    """FSDP PURE: bf16 W and gate without autocast; (a * W) rounded once in bf16, dL/da to bf16 rounding."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 16, generator=generator).bfloat16()
    weight = (torch.randn(12, 16, generator=generator) * 0.02).bfloat16()
    scales = torch.tensor([3.0, 5.0, 7.0]).bfloat16()
    upstream = torch.randn(4, 7, 12, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (x, weight, scales)]
    virtual = leaves[1] * expand_rows(leaves[2], SLICES['gqa'])
    virtual.retain_grad()
    y_ref = F.linear(leaves[0], virtual)
    (y_ref.float() * upstream).sum().backward()
    ours = [t.clone().requires_grad_() for t in (x, weight, scales)]
    y = ScaledLinearFunction.apply(*ours, None, SLICES['gqa'], nonzero)
    (y.float() * upstream).sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.equal(ours[0].grad, leaves[0].grad)
    assert torch.equal(ours[1].grad, leaves[1].grad)
    expected = _gate_grad_float64(virtual.grad, weight, SLICES['gqa'])
    torch.testing.assert_close(ours[2].grad.double(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())


@pytest.mark.parametrize('nonzero', [False, True])
def test_tied_head_and_embedding_under_autocast(nonzero):
    torch.manual_seed(0)
    emb = GatedEmbedding(50, 16, unembed_gate_init=3.0, gate_init=1.5, output_scale=40.0, weight_std=0.02)
    with torch.no_grad():
        emb.weight.normal_(0, 0.02)
    emb.gates_nonzero = nonzero
    tokens = torch.randint(0, 50, (2, 7))
    h = torch.randn(2, 7, 16)
    upstream = torch.randn(2, 7, 50)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = emb(h, unembed=True)
        embedded = emb(tokens)
    ((logits.float() * upstream).sum() + embedded.float().square().sum()).backward()
    weight = emb.weight.detach().clone().requires_grad_()
    gate, head_gate = (g.detach().clone().requires_grad_() for g in (emb.gate, emb.unembed_gate))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        head = weight * head_gate
        head.retain_grad()
        logits_ref = F.linear(h, head)
        embedded_ref = F.embedding(tokens, weight) * (gate * 40.0)
    ((logits_ref.float() * upstream).sum() + embedded_ref.float().square().sum()).backward()
    assert torch.equal(logits, logits_ref)
    torch.testing.assert_close(embedded, embedded_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(emb.weight.grad, weight.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(emb.gate.grad, gate.grad, rtol=1e-5, atol=0)
    expected = (head.grad.double() * emb.weight.detach().double()).sum()
    torch.testing.assert_close(emb.unembed_gate.grad.double()[0], expected, rtol=1e-5, atol=0)


def test_gradient_accumulation_equals_the_reference():
    """Three microbatches accumulate dL/dW and dL/da as plain autograd of a * W does."""
    sizes = SLICES['gqa']
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(12, 16, generator=generator) * 0.02
    scales = torch.tensor([11.0, 13.0, 17.0])
    micro = [(torch.randn(2, 9, 16, generator=generator), torch.randn(2, 9, 12, generator=generator)) for _ in range(3)]
    ref_w, ref_a = weight.clone().requires_grad_(), scales.clone().requires_grad_()
    our_w, our_a = weight.clone().requires_grad_(), scales.clone().requires_grad_()
    gate_grad64 = torch.zeros(3, dtype=torch.float64)
    for x, upstream in micro:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            virtual = ref_w * expand_rows(ref_a, sizes)
            virtual.retain_grad()
            y_ref = F.linear(x, virtual)
            y = ScaledLinearFunction.apply(x, our_w, our_a, None, sizes, True)
        (y_ref.float() * upstream).sum().backward()
        (y.float() * upstream).sum().backward()
        gate_grad64 += _gate_grad_float64(virtual.grad, weight, sizes)
    assert torch.equal(our_w.grad, ref_w.grad)
    torch.testing.assert_close(our_a.grad.double(), gate_grad64, rtol=1e-5, atol=0)


def test_nonzero_flag_follows_the_gates():
    """Set from the initial gates, cleared by a state-dict load, refreshed after each optimizer step."""
    model = mpt(n_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    apply_wesar(model, optimizers=optimizer, seed=0)
    gated = [m for m in model.modules() if isinstance(m, GatedLinear)]
    assert gated and all(m.gates_nonzero for m in gated)
    model.load_state_dict(model.state_dict())
    assert not any(m.gates_nonzero for m in gated)
    tokens = torch.randint(0, 512, (2, 16))
    batch = {'input_ids': tokens, 'labels': tokens.clone(), 'attention_mask': torch.ones_like(tokens)}
    model.loss(model(batch), batch).backward()
    optimizer.step()
    assert all(m.gates_nonzero for m in gated)
    with torch.no_grad():
        gated[0].gate[0] = 0.0
    refresh_nonzero_gates(model)
    assert not gated[0].gates_nonzero and all(m.gates_nonzero for m in gated[1:])


def test_gate_traffic_is_at_most_10_bytes_per_weight_element():
    """The benchmark's count on a small MPT under bf16 autocast (tokens = 4 x d): the gated
    microbatch moves at most 10 bytes per weight element more than the plain one."""
    path = Path(__file__).parents[2] / 'benchmarks' / 'gate_traffic.py'
    sys.path.insert(0, str(path.parent))  # as when the benchmark runs as a script: its folder first
    spec = importlib.util.spec_from_file_location('gate_traffic', path)
    assert spec is not None and spec.loader is not None
    traffic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(traffic)
    d, layers, vocab, seq = 128, 2, 1024, 128
    tokens = torch.randint(0, vocab, (4, seq))
    batch = {'input_ids': tokens, 'labels': tokens.clone(), 'attention_mask': torch.ones_like(tokens)}
    plain, gated = (traffic.build(g, d, layers, vocab, seq, pure=False) for g in (False, True))
    elements = traffic.weight_elements(plain)
    gated_bytes, plain_bytes = traffic.count(gated, batch, False), traffic.count(plain, batch, False)
    extra = sum(gated_bytes.values()) - gated_bytes['(ops)'] - sum(plain_bytes.values()) + plain_bytes['(ops)']
    assert 0 < extra / elements <= 10
