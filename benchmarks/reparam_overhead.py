"""Step time of the compared reparameterizations (Table 6) against Small init, side by side.

Every method trains its own copy of the same MPT (paper shape, untied, vocab 32000) in one
process; the steps are interleaved (small_init, weight_norm, ..., then the next round in a
rotated order) so machine noise hits every method alike. For each round the step time of a
method is divided by that of Small init in the same round; the median of those ratios is
the overhead reported, beside the paper's Table 6 (1.3B, 8 H100s, 10B tokens).

A step is what a training step does: zero_grad, forward, loss, backward, AdamW step over
all parameters (the new ones included), and for sigma-Reparam the request for its one power
iteration.

Methods:
  small_init        paper_init, Small backbone (the baseline)
  wesar             WeSaR (He backbone, sigma^2 = 4e-5)
  weight_norm       Weight Normalization (sigma^2 = 16e-5)
  sigma_reparam     sigma-Reparam, pre-LN (sigma^2 = 64e-5)
  residual_scaling  residual scaling as reparameterization (Small backbone)

Run: .venv/bin/python benchmarks/reparam_overhead.py [--shape 130m|1.3b] [--device cpu|cuda]
     [--methods wesar weight_norm ...] [--batch-size 2] [--seq-len 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from common import SHAPES, make_batch, paper_mpt, timed_step

from wesar_composer import apply_paper_init, apply_residual_scaling, apply_sigma_reparam, apply_weight_norm, apply_wesar
from wesar_composer.algorithms.sigma_reparam import request_power_iteration

BASELINE = 'small_init'
APPLY = {
    'small_init': lambda m: apply_paper_init(m, backbone='small'),
    'wesar': lambda m: apply_wesar(m, sigma_squared=4e-5, backbone='he'),
    'weight_norm': lambda m: apply_weight_norm(m, sigma_squared=16e-5),
    'sigma_reparam': lambda m: apply_sigma_reparam(m, sigma_squared=64e-5),
    'residual_scaling': lambda m: apply_residual_scaling(m, backbone='small'),
}
PAPER = {
    'wesar': 1.95,
    'weight_norm': 12.6,
    'sigma_reparam': 6.25,
    'residual_scaling': 1.58,
}  # Table 6, % vs Small init


def build(method: str, shape: str, seq_len: int, device: str):
    torch.manual_seed(0)
    model = paper_mpt(shape, seq_len, attn_impl='flash' if device == 'cuda' else 'torch')
    APPLY[method](model)
    model = model.to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))


def step(model, optimizer, batch, device: str) -> float:
    # request_power_iteration: a no-op for the methods without a spectral norm
    return timed_step(model, optimizer, batch, device, before_forward=request_power_iteration)


def side_by_side(args) -> tuple[dict[str, float], dict[str, float]]:
    """Median step time of each method and median per-round ratio to Small init."""
    methods = [BASELINE, *[m for m in args.methods if m != BASELINE]]
    models = {m: build(m, args.shape, args.seq_len, args.device) for m in methods}
    torch.manual_seed(1)
    batch = make_batch(args.batch_size, args.seq_len, args.device)
    times = {m: [] for m in methods}
    for i in range(args.warmup + args.steps):
        shift = i % len(methods)
        for m in methods[shift:] + methods[:shift]:  # rotate: no method always first
            elapsed = step(*models[m], batch, args.device)
            if i >= args.warmup:
                times[m].append(elapsed)
    medians = {m: statistics.median(t) for m, t in times.items()}
    ratios = {m: statistics.median(a / b for a, b in zip(times[m], times[BASELINE])) for m in methods}
    return medians, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shape', choices=sorted(SHAPES), default='130m')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--seq-len', type=int, default=256)
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--methods', nargs='+', choices=list(APPLY), default=list(APPLY))
    args = parser.parse_args()

    medians, ratios = side_by_side(args)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(
        f'shape {args.shape}, device {args.device} ({torch.get_num_threads()} threads, load {load:.2f}), '
        f'{args.batch_size * args.seq_len} tokens per step, median of {args.steps} interleaved rounds'
    )
    print(f'{"method":<18}{"step s":>10}{"vs small_init":>16}{"paper (1.3B)":>15}')
    for m, t in medians.items():
        paper = f'+{PAPER[m]:.2f}%' if m in PAPER else ''
        print(f'{m:<18}{t:10.3f}{100 * (ratios[m] - 1):+15.2f}%{paper:>15}')


if __name__ == '__main__':
    main()
