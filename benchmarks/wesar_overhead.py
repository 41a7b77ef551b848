"""Step time and peak memory of a WeSaR-gated model against the same ungated model.

Time: the models train side by side in one process, steps interleaved (plain, gated, plain,
gated, ...), and the ratio of median step times is reported, so machine noise hits both.
Peak memory: one more step per model after the timing; on CUDA the allocator's peak, on CPU
parameters, gradients and optimizer state plus the step's allocation peak (torch profiler).

Variants:
  plain          the ungated model (llm-foundry's init)
  wesar          the product: the gate rides on the products (ScaledLinearFunction), a * W never formed
  wesar-previous the product before the gate moved into autocast's cast of W (kept for before/after timing)
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

import torch
import torch.nn.functional as F
from common import SHAPES, VOCAB_SIZE, make_batch, paper_mpt, timed_step
from llmfoundry.models.layers.custom_embedding import SharedEmbedding

from wesar_composer import apply_wesar
from wesar_composer.algorithms.wesar.modules import GatedEmbedding, GatedLinear
from wesar_composer.reparam.modules import _autocast_dtype, _columns, expand_rows

VARIANTS = ('plain', 'wesar', 'wesar-previous', 'weight-scaling', 'wesar-autograd', 'output-scaling')


def _flash_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec('flash_attn') is not None


def build(variant: str, shape: str, seq_len: int, device: str, arch: str = 'mpt'):
    if arch == 'llama':
        model = _llama(shape, seq_len).to(device)
        if variant != 'plain':
            apply_wesar(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    flash = device == 'cuda' and _flash_installed()
    model = paper_mpt(shape, seq_len, attn_impl='flash' if flash else 'torch').to(device)
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
        vocab_size=VOCAB_SIZE,
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
EMBEDDING_FORWARD = GatedEmbedding.forward


def set_gated_forward(variant: str) -> None:
    """Swap GatedLinear.forward for one of the compared implementations ('plain': the gates bypassed)."""
    GatedEmbedding.forward = SharedEmbedding.forward if variant == 'plain' else EMBEDDING_FORWARD  # type: ignore[method-assign]
    forwards = {
        'plain': lambda self, x: F.linear(x, self.weight, self.bias),
        'wesar': PRODUCT_FORWARD,
        'wesar-previous': lambda self, x: _PreviousScaled.apply(x, self.weight, self.gate, self.bias, self.slice_sizes),
        'weight-scaling': lambda self, x: _WeightScaled.apply(x, self.weight, self.row_gates(), self.bias),
        'wesar-autograd': lambda self, x: F.linear(x, self.weight * self.row_gates(), self.bias),
        'output-scaling': lambda self, x: _output_scaled(self, x),
    }
    GatedLinear.forward = forwards[variant]


def _output_scaled(module: GatedLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias) * module.row_gates().view(-1)


class _PreviousScaled(torch.autograd.Function):
    """The product before the gate moved into the cast (kept to time both in one run): s rounded to
    the compute dtype before it scales W in place, x saved in float32, two passes over G."""

    @staticmethod
    def forward(ctx, x, weight, scales, bias, slice_sizes):
        ctx.slice_sizes = tuple(slice_sizes)
        ctx.has_bias = bias is not None
        ctx.scaled_weight = False
        tokens, (d_out, d_in) = x.numel() // x.shape[-1], weight.shape
        one = len(ctx.slice_sizes) == 1
        sizes = {'y': tokens * d_out, 'w': d_out * d_in, 'x': tokens * d_in if one else float('inf')}
        smallest = min(sizes, key=sizes.__getitem__)
        cast = _autocast_dtype(x)
        if smallest == 'w' and cast is not None and cast != weight.dtype:
            scaled = weight.to(cast).mul_(expand_rows(scales, ctx.slice_sizes).to(cast))  # autocast's cast, scaled
            ctx.save_for_backward(x, weight, scales, scaled)
            ctx.scaled_weight = True
            return F.linear(x, scaled, bias)
        ctx.save_for_backward(x, weight, scales)
        if smallest == 'y':
            y = F.linear(x, weight)
            y.mul_(_columns(scales, ctx.slice_sizes).to(y.dtype))
            return y if bias is None else y.add_(bias.to(y.dtype))
        if smallest == 'x':
            return F.linear(x * scales.to(x.dtype), weight, bias)
        return F.linear(x, weight * expand_rows(scales, ctx.slice_sizes).to(weight.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # x, W, s (and the scaled low-precision W under autocast)
        x, weight, scales = saved[:3]
        sizes = ctx.slice_sizes
        need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
        compute_dtype = grad_out.dtype
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_s = grad_b = None
        if need_x and ctx.scaled_weight:
            grad_x = grad_out @ saved[3].to(compute_dtype)
        elif need_x:
            tokens, (d_out, d_in) = flat_out.shape[0], weight.shape
            one = len(sizes) == 1
            options = {'dx': tokens * d_in if one else float('inf'), 'dy': tokens * d_out, 'w': d_out * d_in}
            smallest = min(options, key=options.__getitem__)
            if smallest == 'dx':
                grad_x = (grad_out @ weight.to(compute_dtype)).mul_(scales.to(compute_dtype))
            elif smallest == 'dy':
                grad_x = (grad_out * _columns(scales, sizes).to(compute_dtype)) @ weight.to(compute_dtype)
            else:
                grad_x = grad_out @ (weight * expand_rows(scales, sizes).to(weight.dtype)).to(compute_dtype)
        if need_w or need_s:
            grad_virtual = (flat_out.t() @ x.reshape(-1, x.shape[-1]).to(compute_dtype)).to(weight.dtype)
            if need_s:
                pairs = zip(grad_virtual.split(list(sizes)), weight.split(list(sizes)))
                grad_s = torch.stack([torch.dot(g.reshape(-1), w.reshape(-1)) for g, w in pairs]).to(scales.dtype)
                grad_s = grad_s.reshape(scales.shape)
            if need_w:
                grad_w = grad_virtual.mul_(expand_rows(scales, sizes).to(grad_virtual.dtype))
        if need_b and ctx.has_bias:
            grad_b = flat_out.sum(0)
        return grad_x, grad_w, grad_s, grad_b, None


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


step = timed_step


def time_side_by_side(args) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    variants = ['plain', *args.variants]
    models = {}
    for v in variants:
        torch.manual_seed(0)
        if args.one_model and models:
            models[v] = next(iter(models.values()))
        else:
            models[v] = build('wesar' if args.one_model else v, args.shape, args.seq_len, args.device, args.arch)
    batch = make_batch(args.batch_size, args.seq_len, args.device)
    times = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        order = variants[i % len(variants) :] + variants[: i % len(variants)]  # rotate: no variant always first
        for v in order:
            if v != 'plain' or args.one_model:
                set_gated_forward(v)
            elapsed = step(*models[v], batch, args.device)
            if i >= args.warmup:
                times[v].append(elapsed)
    memory: dict[str, float] = {}
    if not args.skip_memory:
        for v in variants:
            if v != 'plain' or args.one_model:
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
    parser.add_argument(
        '--one-model',
        action='store_true',
        help="one gated model for every variant, 'plain' with the gates bypassed: the memory of one model",
    )
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
