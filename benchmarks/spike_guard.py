"""The cost of SpikeGuard on the 130M-shape MPT: time spent inside the guard per step, and its host syncs.

The model is the paper's 130M shape (d 768, 12 layers, vocab 32000, untied) with WeSaR, trained by
a Composer Trainer on random tokens with DecoupledAdamW in fp32 on the CPU, with ``spike_guard``
at its defaults (``action: skip``, loss rule). The guard's own work is timed directly around its
handlers (``batch_start``, ``after_backward``, ``batch_end``) and its decision inside the optimizer
step (the all-reduce, the host sync and the window test), so that the figure does not depend on
the run-to-run noise of a shared machine; the step time of the same run is the denominator.
Host syncs inside the guard are counted by wrapping ``Tensor.item`` and ``Tensor.tolist``.

    python benchmarks/spike_guard.py --seq 512 --batch 4 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or '').split('\n')[0])
    parser.add_argument('--seq', type=int, default=512)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--steps', type=int, default=5, help='measured steps (after --warmup)')
    parser.add_argument('--warmup', type=int, default=1)
    args = parser.parse_args()

    import torch
    from composer import Trainer
    from composer.core import Callback
    from composer.optim import DecoupledAdamW
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    from torch.utils.data import DataLoader

    from wesar_composer import SpikeGuard, WeSaR

    torch.manual_seed(0)
    model = ComposerMPTCausalLM(
        d_model=768,
        n_heads=12,
        n_layers=12,
        expansion_ratio=4,
        max_seq_len=args.seq,
        vocab_size=32000,
        no_bias=True,
        norm_type='rmsnorm',
        norm_eps=1e-5,
        learned_pos_emb=False,
        tie_word_embeddings=False,
        attn_config={'attn_impl': 'torch', 'rope': True, 'rope_impl': 'hf'},
        ffn_config={'ffn_type': 'mptmlp', 'ffn_act_fn': {'name': 'gelu'}},
        loss_fn='torch_crossentropy',
    )
    total = args.steps + args.warmup
    tokens = torch.randint(0, 32000, (args.batch * total, args.seq), generator=torch.Generator().manual_seed(0))
    data = [{'input_ids': t, 'labels': t.clone(), 'attention_mask': torch.ones_like(t)} for t in tokens]

    clock = {'wall': 0.0, 'cpu': 0.0, 'syncs': 0, 'inside': False}
    guard = SpikeGuard()

    def timed(method):
        def wrapper(*a, **k):
            wall, cpu = time.perf_counter(), time.process_time()
            clock['inside'] = True
            try:
                return method(*a, **k)
            finally:
                clock['inside'] = False
                clock['wall'] += time.perf_counter() - wall
                clock['cpu'] += time.process_time() - cpu

        return wrapper

    for name in ('_decide', 'batch_start', 'after_backward', 'batch_end'):
        setattr(guard, name, timed(getattr(guard, name)))
    for name in ('item', 'tolist'):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            clock['syncs'] += int(clock['inside'])
            return _original(self, *a, **k)

        setattr(torch.Tensor, name, counted)

    class StepTimer(Callback):
        def __init__(self):
            self.rows: list[tuple[float, float, float, float, int]] = []
            self.marks: tuple[float, float, float, float, int] = (0.0, 0.0, 0.0, 0.0, 0)

        def batch_start(self, state, logger):
            self.marks = (time.perf_counter(), time.process_time(), clock['wall'], clock['cpu'], clock['syncs'])

        def batch_end(self, state, logger):
            wall, cpu, guard_wall, guard_cpu, syncs = self.marks
            self.rows.append(
                (
                    time.perf_counter() - wall,
                    time.process_time() - cpu,
                    clock['wall'] - guard_wall,
                    clock['cpu'] - guard_cpu,
                    clock['syncs'] - syncs,
                )
            )

    timer = StepTimer()
    Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=args.batch),
        optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-5),
        max_duration=f'{total}ba',
        algorithms=[WeSaR()],
        callbacks=[guard, timer],  # the timer's batch_end runs after the guard's
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    ).fit()
    rows = timer.rows[args.warmup :]
    wall, cpu, guard_wall, guard_cpu = (statistics.fmean(r[i] for r in rows) for i in range(4))
    syncs = [r[4] for r in rows]
    print(f'steps measured: {len(rows)}, threads {torch.get_num_threads()}, batch {args.batch} x {args.seq} tokens')
    print(f'step: wall {wall:.3f} s, CPU {cpu:.3f} s')
    print(
        f'inside the guard per step: wall {guard_wall * 1e3:.3f} ms ({100 * guard_wall / wall:.4f}% of a step), '
        f'CPU {guard_cpu * 1e3:.3f} ms ({100 * guard_cpu / cpu:.4f}%)'
    )
    print(f'host syncs inside the guard per step: {syncs}')


if __name__ == '__main__':
    main()
