"""Step time and peak memory of training with UpdateRatioMonitor at log_interval 1 and 10 vs without it.

The model is the paper's 130M shape (d 768, 12 layers, 12 heads, vocab 32000, untied, FFN 4d,
RMSNorm, RoPE, no bias) with WeSaR, trained by a Composer Trainer on random tokens with
DecoupledAdamW in fp32 on the CPU. Each setting runs in a process of its own, so that its peak
resident memory is its own (the high-water mark is reset when training starts, so it is the
peak of the training steps); settings alternate over ``--rounds`` to spread the noise
of a shared machine over all of them. A fourth run at log_interval 2 gives a paired estimate that
slow drifts of background load cannot skew: its logging and quiet batches alternate, so their
mean difference is the cost of one logged step. Wall time is what a user waits; process CPU time
(all threads) is far less sensitive to other jobs on a shared machine. Prints one table.

    python benchmarks/update_ratio_monitor.py --seq 512 --batch 2 --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import cast

SETTINGS = ('none', '1', '10', '2')  # '2': paired estimate, logging and quiet batches alternate in one run


def child(setting: str, seq: int, batch: int, steps: int, warmup: int) -> dict:
    """One run: returns per-step times (after warmup), time spent in the monitor, and peak RSS."""
    import torch
    from common import paper_mpt
    from composer import Trainer
    from composer.core import Callback
    from composer.optim import DecoupledAdamW
    from torch.utils.data import DataLoader

    from wesar_composer import UpdateRatioMonitor, WeSaR

    torch.manual_seed(0)
    model = paper_mpt('130m', seq, norm_eps=1e-5, learned_pos_emb=False)
    tokens = torch.randint(0, 32000, (batch * (steps + warmup), seq), generator=torch.Generator().manual_seed(0))
    data = [{'input_ids': t, 'labels': t.clone(), 'attention_mask': torch.ones_like(t)} for t in tokens]

    clock = {'wall': 0.0, 'cpu': 0.0}  # time spent inside the monitor so far

    class StepTimer(Callback):
        def __init__(self):
            self.wall, self.cpu, self.monitor_wall, self.monitor_cpu, self.marks = [], [], [], [], None

        def fit_start(self, state, logger):
            _reset_peak_rss()  # measure the peak of the training steps, not of building the model

        def batch_start(self, state, logger):
            self.marks = (time.perf_counter(), time.process_time(), clock['wall'], clock['cpu'])

        def batch_end(self, state, logger):  # runs after the monitor's batch_end (listed after it)
            wall, cpu, monitor_wall, monitor_cpu = cast(tuple[float, float, float, float], self.marks)
            self.wall.append(time.perf_counter() - wall)
            self.cpu.append(time.process_time() - cpu)
            self.monitor_wall.append(clock['wall'] - monitor_wall)
            self.monitor_cpu.append(clock['cpu'] - monitor_cpu)

    timer = StepTimer()
    callbacks = []
    if setting != 'none':
        monitor = UpdateRatioMonitor(log_interval=int(setting))
        for name in ('begin_step', 'end_step'):
            method = getattr(monitor, name)

            def timed(*args, _method=method, **kwargs):
                wall, cpu = time.perf_counter(), time.process_time()
                out = _method(*args, **kwargs)
                clock['wall'] += time.perf_counter() - wall
                clock['cpu'] += time.process_time() - cpu
                return out

            setattr(monitor, name, timed)
        callbacks.append(monitor)
    callbacks.append(timer)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=batch),
        optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-5),
        max_duration=f'{steps + warmup}ba',
        algorithms=[WeSaR()],
        callbacks=callbacks,
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    weights = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith('.weight') and p.dim() == 2
    )
    return {
        'wall': timer.wall[warmup:],
        'cpu': timer.cpu[warmup:],
        'monitor_wall': timer.monitor_wall[warmup:],
        'monitor_cpu': timer.monitor_cpu[warmup:],
        'peak_rss_mb': _peak_rss_mb(),
        'matrix_mb': weights / 2**20,
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'threads': torch.get_num_threads(),
    }


def _reset_peak_rss() -> None:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # Linux: reset the resident-set high-water mark (VmHWM)
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=cast(str, __doc__).split('\n\n')[0])
    parser.add_argument('--seq', type=int, default=512)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=20, help='measured steps per run (after --warmup)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument(
        '--settings',
        nargs='+',
        default=list(SETTINGS),
        choices=SETTINGS,
        help="which runs: 'none', '1', '10' (log_interval), '2' (the paired run)",
    )
    parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seq, args.batch, args.steps, args.warmup)))
        return
    settings = [s for s in SETTINGS if s in args.settings]
    if 'none' not in settings:
        parser.error("--settings must include 'none', the baseline")
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for round_ in range(args.rounds):
        for setting in settings:
            cmd = [
                sys.executable,
                __file__,
                '--child',
                setting,
                '--seq',
                str(args.seq),
                '--batch',
                str(args.batch),
                '--steps',
                str(args.steps),
                '--warmup',
                str(args.warmup),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[setting].append(json.loads(out))
            print(f'round {round_ + 1}, monitor {setting}: {json.dumps(runs[setting][-1])}', file=sys.stderr)
    first = runs['none'][0]

    def pooled(setting, key):
        return [t for r in runs[setting] for t in r[key]]

    print(
        f'130M-shape MPT with WeSaR ({first["params_m"]:.1f}M parameters), fp32, CPU ({first["threads"]} threads), '
        f'batch {args.batch} x {args.seq} tokens, {args.steps} measured steps x {args.rounds} rounds per setting'
    )
    print(f'weight matrices measured: {first["matrix_mb"]:.0f} MB (one copy)')
    base_wall, base_cpu = statistics.fmean(pooled('none', 'wall')), statistics.fmean(pooled('none', 'cpu'))
    base_rss = max(r['peak_rss_mb'] for r in runs['none'])
    print(
        f'{"monitor":>12} | {"wall s/step":>11} {"vs none":>8} | {"CPU s/step":>10} {"vs none":>8} | '
        f'{"in monitor: wall s":>18} {"CPU s":>6} {"CPU share":>9} | {"peak RSS MB":>11} {"vs none":>8}'
    )
    for setting in [s for s in settings if s != '2']:
        wall, cpu = statistics.fmean(pooled(setting, 'wall')), statistics.fmean(pooled(setting, 'cpu'))
        monitor_wall, monitor_cpu = (
            statistics.fmean(pooled(setting, 'monitor_wall')),
            statistics.fmean(pooled(setting, 'monitor_cpu')),
        )
        rss = max(r['peak_rss_mb'] for r in runs[setting])
        label = 'none' if setting == 'none' else f'interval {setting}'
        print(
            f'{label:>12} | {wall:11.2f} {100 * (wall / base_wall - 1):+7.1f}% | {cpu:10.2f} {100 * (cpu / base_cpu - 1):+7.1f}% | '
            f'{monitor_wall:18.3f} {monitor_cpu:6.3f} {100 * monitor_cpu / base_cpu:8.2f}% | {rss:11.0f} {rss - base_rss:+8.0f}'
        )
    for key, unit in (('wall', 'wall'), ('cpu', 'CPU')) if '2' in runs else ():
        logging, quiet = [], []
        for r in runs['2']:
            for i, t in enumerate(r[key]):
                (logging if (args.warmup + i + 1) % 2 == 0 else quiet).append(t)
        cost, step = statistics.fmean(logging) - statistics.fmean(quiet), statistics.fmean(quiet)
        print(
            f'paired, {unit} time (interval 2, logging and quiet batches alternate in one run): '
            f'{statistics.fmean(logging):.2f} vs {step:.2f} s: a logged step costs {cost:+.3f} s, '
            f'{100 * cost / step:+.2f}% of a step at interval 1, {10 * cost / step:+.2f}% at interval 10'
        )


if __name__ == '__main__':
    main()
