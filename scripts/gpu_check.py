"""GPU check: the gate's step-time cost on a GPU, and the paths a cluster run takes, in one budgeted call.

Stages, in this order, each in its own process with a share of ``--budget-s`` (a stage that
runs out of time is reported as such and the next one starts):

1. ``benchmarks/wesar_overhead.py --device cuda --one-model``: gated / plain step time, bf16
   autocast, AdamW, the current gate and the previous one (``wesar-previous``) interleaved in
   one process on one model (plain = the gates bypassed, so a 1.3B model fits an 80 GB H100):
   Llama (PyTorch SDPA attention) at 130M (8 x 2048 tokens) and 1.3B (4 x 2048), and
   llm-foundry's MPT at 130M (``attn_impl: flash`` where flash-attn is installed, else ``torch``).
2. ``scripts/gpu_paper_case.py``: the paper's 130M rapid recipe for 100 steps on the demo data,
   Small init at lr x sqrt(2/(5d)) / sigma against WeSaR at lr (the same relative steps): the
   loss, the last layer's d/u update-ratio gap and the largest attention logit of each.
3. llm-foundry's train path under ``composer -n 1`` on the demo YAML's model (d 128, 4 layers),
   WeSaR with the update-ratio monitor and the spike counter, ``init_device: meta``,
   ``precision: amp_bf16``, 20 batches:

   - FSDP1 FULL_SHARD, mixed precision PURE;
   - FSDP2 (``FSDP_VERSION=2``);
   - FSDP1 with ``compile_config: {}``;
   - FSDP1 with a sharded checkpoint and an ``hf_checkpointer`` export at batch 10, then a run
     resumed from that checkpoint (its losses of batches 11 to 20 beside the uninterrupted run's);
   - the export loaded by plain ``transformers`` (no gate key; logits finite).

Needs the package installed (its entry points register the algorithms with llm-foundry) and a
dataset built by ``wesar-data`` (default ``data/shakespeare-v4096-s128``). Writes
``OUT/table.md`` and ``OUT/logs.tar.gz``; prints the table last.

Run from the repository root:  python scripts/gpu_check.py --out runs/gpu_check [--budget-s 480]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (arch, shape, sequences of 2048 tokens per step, seconds at most). At 1.3B two models with AdamW
# state and the activations of 8 x 2048 tokens do not fit in one H200 (139 GiB) together: 4 x 2048.
BENCH = [('llama', '130m', 8, 90), ('llama', '1.3b', 4, 170), ('mpt', '130m', 8, 90)]
PATH_CASES = ('fsdp1', 'fsdp2', 'compile', 'compile-small', 'sharded', 'resumed', 'export', 'paper-130m')


class Budget:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def sh(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[str, float]:
    """Run ``cmd`` with its output in ``log``: ('ok' | 'exit N' | 'timeout', seconds).

    The command runs in a process group of its own; on a timeout the whole group is killed, so
    that no worker a launcher started keeps the GPU.
    """
    start = time.time()
    with open(log, 'w') as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=max(timeout, 1))
            result = 'ok' if code == 0 else f'exit {code}'
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            result = 'timeout'
    return result, time.time() - start


def last_error(log: Path) -> str:
    lines = [x for x in log.read_text(errors='replace').splitlines() if x.strip()]
    errors = [x for x in lines if re.search(r'(Error|Exception)\b', x)]
    return (errors or lines or [''])[-1].strip()[:200]


def bench(out: Path, budget: Budget, rows: list, cases) -> None:
    for arch, shape, batch, cap in BENCH:
        if f'bench-{arch}-{shape}' not in cases:
            continue
        log = out / f'bench-{arch}-{shape}.log'
        cmd = [
            sys.executable,
            'benchmarks/wesar_overhead.py',
            '--device',
            'cuda',
            '--arch',
            arch,
            '--shape',
            shape,
            '--batch-size',
            str(batch),
            '--seq-len',
            '2048',
            '--steps',
            '8',
            '--warmup',
            '3',
            '--variants',
            'wesar',
            'wesar-previous',
            '--one-model',
            '--skip-memory',
        ]
        result, seconds = sh(cmd, log, min(cap, budget.left() * 0.55))
        text = log.read_text(errors='replace')
        plain = re.search(r'^plain\s+([\d.]+)', text, re.M)
        gated = re.search(r'^wesar\s+([\d.]+)\s+([+-][\d.]+%)', text, re.M)
        previous = re.search(r'^wesar-previous\s+([\d.]+)\s+([+-][\d.]+%)', text, re.M)
        if result == 'ok' and plain and gated and previous:
            note = f'plain {plain.group(1)} s, wesar {gated.group(1)} s; previous gate {previous.group(2)}'
            rows.append(
                (f'step time {arch} {shape}, {batch} x 2048, bf16', 'ok', f'{seconds:.0f}', gated.group(2), note)
            )
        else:
            rows.append(
                (f'step time {arch} {shape}, {batch} x 2048, bf16', result, f'{seconds:.0f}', '', last_error(log))
            )


def train(
    name: str, out: Path, data: Path, extra: list[str], timeout: float, env: dict | None = None, method: str = 'wesar'
):
    """One short run of the demo YAML through llm-foundry; (result, seconds, {batch: loss}, log)."""
    log = out / f'{name}.log'
    overrides = [
        f'variables.method={method}',
        f'variables.data_root={data}',
        f'variables.run_name={name}',
        'model.init_device=meta',
        'precision=amp_bf16',
        'max_duration=20ba',
        'scheduler.t_warmup=5ba',
        'eval_interval=20ba',
        'eval_subset_num_batches=2',
        'loggers=null',
        'progress_bar=false',
        'log_to_console=true',
        'console_log_interval=1ba',
        'callbacks.update_ratio_monitor.log_interval=1',
        'fsdp_config.sharding_strategy=FULL_SHARD',
        'fsdp_config.mixed_precision=PURE',
        *extra,
    ]
    cmd = [
        sys.executable,
        '-m',
        'composer.cli.launcher',
        '-n',
        '1',
        '-m',
        'llmfoundry.cli.cli',
        'train',
        'wesar_composer/tools/yamls/demo.yaml',
        *overrides,
    ]
    result, seconds = sh(cmd, log, timeout, env)
    text = log.read_text(errors='replace')
    losses = {
        int(b): float(v)
        for b, v in re.findall(r'\[batch=(\d+)/\d+\]:[\s\S]*?Train loss/train/total: ([\d.eE+-]+)', text)
    }
    return result, seconds, losses, log


def _checkpoint(folder: Path) -> Path:
    """The batch-10 checkpoint Composer wrote in ``folder`` (a sharded one is a folder)."""
    found = sorted(folder.glob('ep0-ba10*')) if folder.is_dir() else []
    return found[0] if found else folder / 'ep0-ba10'


def paths(out: Path, data: Path, budget: Budget, rows: list, selected) -> None:
    cases = [
        ('fsdp1', 'FSDP1 FULL_SHARD PURE, meta, bf16', [], None, 'wesar'),
        ('fsdp2', 'FSDP2, meta, bf16', [], {'FSDP_VERSION': '2'}, 'wesar'),
        ('compile', 'FSDP1 + compile_config', ['compile_config={}'], None, 'wesar'),
        ('compile-small', 'FSDP1 + compile_config, Small init (no gates)', ['compile_config={}'], None, 'small_init'),
    ]
    sharded = out / 'sharded'
    save = [
        'fsdp_config.state_dict_type=sharded',
        f'save_folder={sharded / "ckpt"}',
        'save_interval=10ba',
        f'callbacks.hf_checkpointer.save_folder={sharded / "hf"}',
        'callbacks.hf_checkpointer.save_interval=10ba',
        'callbacks.hf_checkpointer.precision=bfloat16',
    ]
    cases.append(('sharded', 'sharded checkpoint + hf export at 10', save, None, 'wesar'))
    cases.append(
        ('resumed', 'resumed from the sharded checkpoint', ['fsdp_config.state_dict_type=sharded'], None, 'wesar')
    )
    cases = [c for c in cases if c[0] in selected]
    losses_of = {}
    for i, (name, label, extra, env, method) in enumerate(cases):
        if name == 'resumed':
            extra = [*extra, f'load_path={_checkpoint(sharded / "ckpt")}']
        timeout = budget.left() / (len(cases) - i + 0.5)
        result, seconds, losses, log = train(name, out, data, extra, timeout, env, method)
        losses_of[name] = losses
        note = '' if result == 'ok' else last_error(log)
        if name == 'resumed' and losses and losses_of.get('sharded'):
            diffs = [abs(losses[b] - losses_of['sharded'][b]) for b in losses if b > 10 and b in losses_of['sharded']]
            note = f'batches 11-20: max |loss - uninterrupted| = {max(diffs):.2e}' if diffs else 'no common batches'
        first = f'{losses[min(losses)]:.3f}' if losses else ''
        last = f'{losses[max(losses)]:.3f} @ {max(losses)}' if losses else ''
        rows.append((label, result, f'{seconds:.0f}', f'{first} -> {last}', note))
    if 'export' not in selected:
        return
    exports = sorted((sharded / 'hf').glob('huggingface/ba*'))
    if exports:
        code = (
            'import torch; from transformers import AutoModelForCausalLM; '
            f'm = AutoModelForCausalLM.from_pretrained("{exports[-1]}", trust_remote_code=True, '
            'torch_dtype=torch.bfloat16).cuda(); '
            'assert not any("gate" in k for k in m.state_dict()), "gate key in the export"; '
            'x = torch.randint(0, 4096, (1, 64), device="cuda"); '
            'y = m(x).logits.float(); assert torch.isfinite(y).all(); print("max |logit|", y.abs().max().item())'
        )
        log = out / 'hf_export.log'
        result, seconds = sh([sys.executable, '-c', code], log, min(120, max(budget.left(), 1)))
        rows.append(('hf export, plain transformers', result, f'{seconds:.0f}', '', last_error(log)))
    else:
        rows.append(('hf export, plain transformers', 'no export', '', '', ''))


def paper_case(out: Path, data: Path, budget: Budget, rows: list) -> None:
    """scripts/gpu_paper_case.py: the 130M recipe, 100 steps, Small init at matched relative steps against WeSaR."""
    log = out / 'paper-130m.log'
    cmd = [sys.executable, 'scripts/gpu_paper_case.py', '--data', str(data), '--out', str(out / 'paper_case')]
    result, seconds = sh(cmd, log, min(150, max(budget.left() * 0.4, 1)))
    table = re.findall(r'^\| (small_init|wesar) \| (.*) \|$', log.read_text(errors='replace'), re.M)
    if result != 'ok' or not table:
        rows.append(('paper 130M, 100 steps: Small init vs WeSaR', result, f'{seconds:.0f}', '', last_error(log)))
    for method, cells in table:
        lr, first, last, gap, logit = (c.strip() for c in cells.split('|'))
        figure = f'loss {first} -> {last}, d/u {gap}, max attention logit {logit}'
        rows.append((f'paper 130M, 100 steps, {method} at lr {lr}', result, f'{seconds:.0f}', figure, ''))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=ROOT / 'runs' / 'gpu_check')
    parser.add_argument('--data', type=Path, default=ROOT / 'data' / 'shakespeare-v4096-s128')
    parser.add_argument('--budget-s', type=float, default=480)
    every = [f'bench-{arch}-{shape}' for arch, shape, _, _ in BENCH] + list(PATH_CASES)
    parser.add_argument('--cases', nargs='+', choices=every, default=every, help='default: all')
    args = parser.parse_args()
    budget = Budget(args.budget_s)
    out = args.out.resolve()
    logs = out / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
    print(f'torch {torch.__version__}, {device}', flush=True)
    rows: list[tuple] = []
    bench(logs, budget, rows, args.cases)
    if 'paper-130m' in args.cases:
        paper_case(logs, args.data.resolve(), budget, rows)
    paths(logs, args.data.resolve(), budget, rows, args.cases)
    header = ('case', 'result', 's', 'figure', 'note')
    table = [
        f'GPU check on {device}, torch {torch.__version__}',
        '',
        ' | '.join(header),
        ' | '.join('---' for _ in header),
    ]
    table += [' | '.join(str(c) for c in row) for row in rows]
    (out / 'table.md').write_text('\n'.join(table) + '\n')
    with tarfile.open(out / 'logs.tar.gz', 'w:gz') as tar:
        for log in sorted(logs.glob('*.log')):
            tar.add(log, arcname=log.name)
    print('\n'.join(table))


if __name__ == '__main__':
    main()
