"""Step time and peak memory of a WeSaR-gated model against the same ungated model.

Time: the models train side by side in one process, steps interleaved (plain, gated, plain,
gated, ...), and the ratio of median step times is reported, so machine noise hits both.
Peak memory: one more step per model after the timing; on CUDA the allocator's peak, on CPU
parameters, gradients and optimizer state plus the step's allocation peak (torch profiler).

Variants:
  plain          the ungated model (llm-foundry's init)
  wesar          the product: the gate rides on the products (ScaledLinearFunction), a * W never formed
  weight-scaling the previous custom function: a * W formed in forward and again in backward
  wesar-autograd a * W by plain autograd (keeps a * W alive until backward)
  output-scaling a * (x W^T) by plain autograd (keeps the output for the gate's gradient)

Architectures: ``mpt`` (llm-foundry's MPT, the paper's shape: FFN 4d gelu; ``attn_impl: torch``
on CPU, ``flash`` on CUDA when flash-attn is installed, else ``torch``) and ``llama``
(transformers' Llama through llm-foundry's ``hf_causal_lm``: SwiGLU FFN of 8d/3, PyTorch SDPA
attention, which runs the fused flash kernel on CUDA without the flash-attn package).

Run: .venv/bin/python benchmarks/wesar_overhead.py [--shape 130m|1.3b] [--device cpu|cuda] [--arch mpt|llama]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from wesar_composer import apply_wesar
from wesar_composer.algorithms.wesar.gated_modules import GatedLinear

SHAPES = {
    '130m': dict(d_model=768, n_heads=12, n_layers=12),
    '1.3b': dict(d_model=2048, n_heads=16, n_layers=24),
}
VARIANTS = ('plain', 'wesar', 'weight-scaling', 'wesar-autograd', 'output-scaling')


def _flash_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec('flash_attn') is not None


def build(variant: str, shape: str, seq_len: int, device: str, arch: str = 'mpt'):
    if arch == 'llama':
        model = _llama(shape, seq_len).to(device)
        if variant != 'plain':
            apply_wesar(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    from llmfoundry.models.mpt import ComposerMPTCausalLM

    flash = device == 'cuda' and _flash_installed()
    attn = {'attn_impl': 'flash' if flash else 'torch', 'rope': True, 'rope_impl': 'hf'}
    model = ComposerMPTCausalLM(
        **SHAPES[shape],
        expansion_ratio=4,
        max_seq_len=seq_len,
        vocab_size=32000,
        no_bias=True,
        norm_type='rmsnorm',
        attn_config=attn,
        ffn_config={'ffn_type': 'mptmlp', 'ffn_act_fn': {'name': 'gelu'}},
        tie_word_embeddings=False,
        loss_fn='torch_crossentropy',
        init_device='cpu',
    ).to(device)
    if variant != 'plain':
        apply_wesar(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))


def _llama(shape: str, seq_len: int):
    import tempfile

    from llmfoundry.models.hf import ComposerHFCausalLM
    from transformers.models.llama import LlamaConfig

    dims = SHAPES[shape]
    d = dims['d_model']
    config = LlamaConfig(
        hidden_size=d,
        intermediate_size=256 * round(8 * d / 3 / 256),  # SwiGLU at about the parameters of a 4d FFN
        num_attention_heads=dims['n_heads'],
        num_key_value_heads=dims['n_heads'],
        num_hidden_layers=dims['n_layers'],
        vocab_size=32000,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        return ComposerHFCausalLM(
            tokenizer=None,
            pretrained_model_name_or_path=folder,
            pretrained=False,
            use_train_metrics=False,
            config_overrides={'_attn_implementation': 'sdpa'},
        )


PRODUCT_FORWARD = GatedLinear.forward  # kept before any variant is swapped in


def set_gated_forward(variant: str) -> None:
    """Swap GatedLinear.forward for one of the compared implementations."""
    forwards = {
        'wesar': PRODUCT_FORWARD,
        'weight-scaling': lambda self, x: _WeightScaled.apply(x, self.weight, self.row_gates(), self.bias),
        'wesar-autograd': lambda self, x: F.linear(x, self.weight * self.row_gates(), self.bias),
        'output-scaling': lambda self, x: _output_scaled(self, x),
    }
    GatedLinear.forward = forwards[variant]


def _output_scaled(module: GatedLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias) * module.row_gates().view(-1)


class _WeightScaled(torch.autograd.Function):
    """The earlier implementation, for comparison: x (g * W)^T with g * W formed in forward and in backward."""

    @staticmethod
    def forward(ctx, x, weight, row_gates, bias):
        ctx.save_for_backward(x, weight, row_gates)
        ctx.has_bias = bias is not None
        return F.linear(x, weight * row_gates, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, row_gates = ctx.saved_tensors
        dtype = grad_out.dtype
        grad_x = grad_out @ (weight * row_gates).to(dtype)
        flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_virtual = (flat.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(weight.dtype)
        grad_g = (grad_virtual * weight).sum(dim=1, keepdim=True)
        if row_gates.shape[0] == 1:
            grad_g = grad_g.sum(dim=0, keepdim=True)
        grad_b = flat.sum(0) if ctx.has_bias else None
        return grad_x, grad_virtual * row_gates, grad_g, grad_b


def step(model, optimizer, batch, device: str, zero_grad: bool = True) -> float:
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
        loss = model.loss(model(batch), batch)
    loss.backward()
    optimizer.step()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def make_batch(batch_size: int, seq_len: int, device: str):
    tokens = torch.randint(0, 32000, (batch_size, seq_len), device=device)
    return {'input_ids': tokens, 'labels': tokens.clone(), 'attention_mask': torch.ones_like(tokens)}


def time_side_by_side(args) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    variants = ['plain', *args.variants]
    models = {}
    for v in variants:
        torch.manual_seed(0)
        models[v] = build(v, args.shape, args.seq_len, args.device, args.arch)
    batch = make_batch(args.batch_size, args.seq_len, args.device)
    times = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        order = variants[i % len(variants) :] + variants[: i % len(variants)]  # rotate: no variant always first
        for v in order:
            if v != 'plain':
                set_gated_forward(v)
            elapsed = step(*models[v], batch, args.device)
            if i >= args.warmup:
                times[v].append(elapsed)
    memory: dict[str, float] = {}
    if not args.skip_memory:
        for v in variants:
            if v != 'plain':
                set_gated_forward(v)
            memory[v] = peak_memory(*models[v], batch, args.device)
    ratios = {v: statistics.median(t / p for t, p in zip(times[v], times['plain'])) for v in variants}
    return {v: statistics.median(t) for v, t in times.items()}, ratios, memory


def peak_memory(model, optimizer, batch, device: str) -> float:
    """Peak memory (MiB) of one training step: persistent tensors plus the step's allocation peak.

    On CUDA the allocator's own peak. On CPU, parameters, gradients and optimizer state plus
    the highest running sum of the allocations the profiler records during the step.
    """
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, batch, device)
        return torch.cuda.max_memory_allocated() / 2**20
    step(model, optimizer, batch, device)  # optimizer state exists from here on
    optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the profile
    persistent = sum(t.numel() * t.element_size() for t in _persistent_tensors(model, optimizer))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, optimizer, batch, device, zero_grad=False)
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage  # allocations positive, frees ('[memory]') negative
        peak = max(peak, running)
    return (persistent + peak) / 2**20


def _persistent_tensors(model, optimizer):
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    for state in optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shape', choices=sorted(SHAPES), default='130m')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--arch', choices=['mpt', 'llama'], default='mpt')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--seq-len', type=int, default=512)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--variants', nargs='+', choices=VARIANTS[1:], default=list(VARIANTS[1:]))
    parser.add_argument('--skip-memory', action='store_true')
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    medians, ratios, memory = time_side_by_side(args)
    tokens = args.batch_size * args.seq_len
    print(
        f'{args.arch} {args.shape}, device {args.device}, {tokens} tokens per step, '
        f'median of {args.steps} interleaved steps'
    )
    print(f'{"variant":<16}{"step s":>10}{"time vs plain":>16}{"peak MiB":>12}{"memory vs plain":>18}')
    for v, t in medians.items():
        time_ratio = f'{100 * (ratios[v] - 1):+.2f}%'  # median over the interleaved pairs of gated / plain
        mem = f'{memory[v]:12.0f}{100 * (memory[v] / memory["plain"] - 1):+17.2f}%' if memory else ''
        print(f'{v:<16}{t:10.3f}{time_ratio:>16}{mem}')


if __name__ == '__main__':
    main()
