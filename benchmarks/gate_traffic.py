"""Bytes moved by the gate: one training microbatch of a gated MPT against the same plain MPT.

Every aten op that one forward and backward dispatch is counted with the bytes of its tensor
inputs and outputs (an in-place op reads and writes its tensor; an ``out=`` argument is only
written); ops that only make views or allocate are left out. The matmuls are the same in both models, so
the difference is the memory traffic the gate adds, which on a GPU is its cost. It is reported
per element of the gated weight matrices (embedding and head included) and by op.

The default shape keeps tokens = 4 x d_model, as the 1.3B recipe's microbatch of 4 x 2,048
tokens at d 2,048, under ``torch.autocast('cpu', dtype=torch.bfloat16)`` (the autocast path of
a GPU run; the counts do not depend on the device). ``--pure`` builds bf16 parameters and runs
without autocast, as FSDP's ``mixed_precision: PURE`` computes.

Run: .venv/bin/python benchmarks/gate_traffic.py [--d-model 256 --n-layers 4 --tokens 1024 --vocab 4096]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from common import paper_mpt
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wesar_composer import apply_wesar
from wesar_composer.algorithms.wesar.modules import GatedEmbedding, GatedLinear

_UNMARKED_VIEWS = {'_unsafe_view', 'lift_fresh'}  # views whose schema does not say so
_ALLOCATIONS = {'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided'}  # nothing read or written


def _is_view(func) -> bool:
    """An op whose outputs alias an input without writing it (view, reshape, transpose, ...)."""
    if func.overloadpacket.__name__ in _UNMARKED_VIEWS | _ALLOCATIONS:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class TrafficCounter(TorchDispatchMode):
    """Bytes of the tensor inputs and outputs of every dispatched op that is not a view, by op name."""

    def __init__(self):
        super().__init__()
        self.bytes_by_op: Counter[str] = Counter()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _is_view(func):
            out_args = {a.name for a in func._schema.arguments if a.is_out}
            inputs = tree_flatten((args, {k: v for k, v in kwargs.items() if k not in out_args}))[0]
            outputs = tree_flatten(out)[0]
            self.bytes_by_op[func.overloadpacket.__name__] += _nbytes(inputs) + _nbytes(outputs)
            self.calls += 1
        return out


def build(gated: bool, d_model: int, n_layers: int, vocab: int, seq_len: int, pure: bool):
    torch.manual_seed(0)
    shape = {'d_model': d_model, 'n_heads': max(1, d_model // 64), 'n_layers': n_layers, 'vocab_size': vocab}
    model = paper_mpt('130m', seq_len, **shape)
    if gated:
        apply_wesar(model, seed=0)
    return model.to(torch.bfloat16) if pure else model


def count(model, batch: dict, pure: bool) -> Counter[str]:
    """Bytes by op of one forward and backward (gradients start empty, as at the first microbatch).

    The number of ops (kernels, on a GPU) that moved them is under the key ``'(ops)'``."""
    model.zero_grad(set_to_none=True)
    counter = TrafficCounter()
    with counter, torch.autocast('cpu', dtype=torch.bfloat16, enabled=not pure):
        loss = model.loss(model(batch), batch)
    with counter:
        loss.backward()
    return Counter({**counter.bytes_by_op, '(ops)': counter.calls})


def weight_elements(model) -> int:
    """Elements of the matrices WeSaR gates: every linear weight, the embedding and the head."""
    return sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, GatedEmbedding))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or '').split('\n\n')[0])
    parser.add_argument('--d-model', type=int, default=256)
    parser.add_argument('--n-layers', type=int, default=4)
    parser.add_argument('--tokens', type=int, default=1024, help='tokens per microbatch (default 4 x d_model)')
    parser.add_argument('--seq-len', type=int, default=256)
    parser.add_argument('--vocab', type=int, default=4096)
    parser.add_argument('--pure', action='store_true', help='bf16 parameters, no autocast (FSDP PURE)')
    parser.add_argument('--top', type=int, default=8, help='ops listed by their difference')
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.tokens // args.seq_len, args.seq_len), generator=generator)
    batch = {'input_ids': tokens, 'labels': tokens.clone(), 'attention_mask': torch.ones_like(tokens)}
    plain = build(False, args.d_model, args.n_layers, args.vocab, args.seq_len, args.pure)
    gated = build(True, args.d_model, args.n_layers, args.vocab, args.seq_len, args.pure)
    assert any(isinstance(m, GatedLinear) for m in gated.modules())
    elements = weight_elements(plain)
    plain_bytes, gated_bytes = count(plain, batch, args.pure), count(gated, batch, args.pure)
    plain_ops, gated_ops = plain_bytes.pop('(ops)'), gated_bytes.pop('(ops)')
    extra = sum(gated_bytes.values()) - sum(plain_bytes.values())
    mode = 'bf16 parameters, no autocast' if args.pure else 'fp32 parameters, bf16 autocast'
    print(
        f'MPT d {args.d_model}, {args.n_layers} layers, vocab {args.vocab}, {args.tokens} tokens, {mode}; '
        f'{elements:,} weight elements'
    )
    print(f'plain: {sum(plain_bytes.values()) / elements:.2f} B per weight element')
    print(f'gated: {sum(gated_bytes.values()) / elements:.2f} B per weight element')
    print(f'extra: {extra / elements:+.2f} B per weight element per microbatch')
    print(f'ops (kernels): plain {plain_ops}, gated {gated_ops} ({gated_ops - plain_ops:+d})')
    diff = {op: gated_bytes[op] - plain_bytes[op] for op in set(gated_bytes) | set(plain_bytes)}
    for op, delta in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]:
        if delta:
            print(f'  {op:<24} {delta / elements:+.2f}')


if __name__ == '__main__':
    main()
