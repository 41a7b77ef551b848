"""GPU check of the paths a cluster run takes: one script, one table, under 8 minutes on one H100.

Runs the 130M paper YAML (yamls/paper/*-130m-rapid.yaml) shortened to a few dozen steps on
the offline corpus (``wesar-data``), WeSaR and Small init, through ``composer -n 1`` and
llm-foundry's train path, with the cluster settings: ``init_device: meta``, ``amp_bf16``,
flash attention, and

- FSDP1 FULL_SHARD, mixed precision PURE;
- FSDP2 (``FSDP_VERSION=2``);
- FSDP1 with ``compile_config: {}``;
- a sharded checkpoint at batch 20 and a resumed run to batch 30 (its batch-21 loss beside the
  uninterrupted run's);
- the ``hf_checkpointer`` export loaded by plain ``transformers`` (no gate key, finite logits);

then the gated / plain step-time ratio of ``benchmarks/wesar_overhead.py`` at 130M and 1.3B,
8 x 2048-token micro-batches in bf16.

Needs the package installed with its stack plus flash-attn (``pip install -e . flash-attn``).
Run from the repository root:  python scripts/gpu_check.py [--out runs/gpu_check] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METHODS = {'wesar': 'wesar', 'small': 'small_init'}


def sh(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 900) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``; (return code, seconds)."""
    start = time.time()
    with open(log, 'w') as f:
        proc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT
        )
    return proc.returncode, time.time() - start


def train(name: str, method: str, out: Path, data: Path, steps: int, extra: list[str], env: dict | None = None):
    """One shortened 130M run; returns (ok, seconds, losses by batch)."""
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    yaml_path = ROOT / 'yamls' / 'paper' / f'{METHODS[method]}-130m-rapid.yaml'
    overrides = [
        f'variables.data_local={data / "mds"}',
        f'variables.tokenizer_name={data / "tokenizer"}',
        f'variables.run_name={name}',
        f'variables.save_folder={run_dir / "ckpt"}',
        f'max_duration={steps}ba',
        'scheduler.t_warmup=5ba',
        'global_train_batch_size=8',
        'device_train_microbatch_size=8',
        'eval_interval=1000ba',
        'save_interval=1000ba',
        'loggers=null',
        'console_log_interval=1ba',
        'log_to_console=true',
        'progress_bar=false',
        'train_loader.num_workers=2',
        'eval_loader.num_workers=2',
        *extra,
    ]
    cmd = [str(BIN / 'composer'), '-n', '1', '-m', 'llmfoundry.cli.cli', 'train', str(yaml_path), *overrides]
    code, seconds = sh(cmd, run_dir / 'log.txt', env)
    text = (run_dir / 'log.txt').read_text(errors='replace')
    losses = {
        int(b): float(v)
        for b, v in re.findall(r'\[batch=(\d+)/\d+\]:[\s\S]*?Train loss/train/total: ([\d.eE+-]+)', text)
    }
    return code == 0, seconds, losses, text


def hf_export_loads(folder: Path) -> str:
    """Load the newest export with plain transformers; 'ok' or the error."""
    exports = sorted(folder.glob('huggingface/ba*'), key=lambda p: int(p.name[2:]))
    if not exports:
        return 'no export'
    code = (
        'import torch, sys; from transformers import AutoModelForCausalLM; '
        f'm = AutoModelForCausalLM.from_pretrained("{exports[-1]}", trust_remote_code=True, torch_dtype=torch.bfloat16).cuda(); '
        'assert not any("gate" in k for k in m.state_dict()); '
        'x = torch.randint(0, 4096, (1, 64), device="cuda"); '
        'y = m(x).logits.float(); assert torch.isfinite(y).all(); print("ok", y.abs().max().item())'
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=ROOT / 'runs' / 'gpu_check')
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--skip-bench', action='store_true')
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / 'data'
    code, _ = sh(
        [str(BIN / 'wesar-data'), '--output-dir', str(data), '--seq-len', '2048', '--vocab-size', '4096'],
        out / 'data.log',
    )
    if code:
        sys.exit(f'wesar-data failed: see {out / "data.log"}')

    fsdp1 = ['fsdp_config.sharding_strategy=FULL_SHARD', 'fsdp_config.mixed_precision=PURE', 'precision=amp_bf16']
    rows = []

    def record(case: str, method: str, ok: bool, seconds: float, losses: dict, note: str = '') -> None:
        last = losses.get(max(losses)) if losses else float('nan')
        rows.append(
            (
                case,
                method,
                'ok' if ok else 'FAILED',
                f'{seconds:.0f}',
                f'{losses.get(1, float("nan")):.3f}',
                f'{last:.3f}',
                note,
            )
        )

    for method in METHODS:
        ok, t, losses, _ = train(f'fsdp1-{method}', method, out, data, args.steps, fsdp1)
        record('FSDP1 FULL_SHARD PURE, meta, bf16, flash', method, ok, t, losses)
        ok, t, losses, _ = train(f'fsdp2-{method}', method, out, data, args.steps, fsdp1, env={'FSDP_VERSION': '2'})
        record('FSDP2, meta, bf16, flash', method, ok, t, losses)
        ok, t, losses, _ = train(f'compile-{method}', method, out, data, args.steps, [*fsdp1, 'compile_config={}'])
        record('FSDP1 + compile_config', method, ok, t, losses)

    # Sharded checkpoint and resume (WeSaR), with the hf_checkpointer export of the first run.
    sharded = [*fsdp1, 'fsdp_config.state_dict_type=sharded']
    first = out / 'sharded-wesar'
    hf = [
        'callbacks.hf_checkpointer.save_folder=' + str(first / 'hf'),
        'callbacks.hf_checkpointer.save_interval=20ba',
        'callbacks.hf_checkpointer.precision=bfloat16',
    ]
    ok, t, whole, _ = train('sharded-wesar', 'wesar', out, data, args.steps, [*sharded, 'save_interval=20ba', *hf])
    record('sharded checkpoint at 20 + hf export', 'wesar', ok, t, whole)
    checkpoint = first / 'ckpt' / 'ep0-ba20'
    ok, t, resumed, _ = train('resumed-wesar', 'wesar', out, data, args.steps, [*sharded, f'load_path={checkpoint}'])
    note = f'batch 21 loss {resumed.get(21, float("nan")):.4f} vs {whole.get(21, float("nan")):.4f} uninterrupted'
    record('resume from the sharded checkpoint', 'wesar', ok, t, resumed, note)
    rows.append(('hf_checkpointer export, plain transformers', 'wesar', hf_export_loads(first / 'hf'), '', '', '', ''))

    print()
    header = ('case', 'method', 'result', 's', 'loss@1', 'loss@last', 'note')
    print(' | '.join(header))
    print(' | '.join('---' for _ in header))
    for row in rows:
        print(' | '.join(str(c) for c in row))

    if not args.skip_bench:
        for shape in ('130m', '1.3b'):
            cmd = [
                sys.executable,
                str(ROOT / 'benchmarks' / 'wesar_overhead.py'),
                '--device',
                'cuda',
                '--shape',
                shape,
                '--batch-size',
                '8',
                '--seq-len',
                '2048',
                '--steps',
                '10',
                '--warmup',
                '3',
                '--variants',
                'wesar',
            ]
            code, _ = sh(cmd, out / f'bench-{shape}.log')
            print(f'\nstep time, {shape}, 8 x 2048 tokens, bf16 autocast:')
            print((out / f'bench-{shape}.log').read_text(errors='replace')[-1200:])
    (out / 'table.json').write_text(json.dumps(rows))


if __name__ == '__main__':
    main()
