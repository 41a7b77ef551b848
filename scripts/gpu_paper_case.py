"""The paper's 130M rapid recipe on one GPU for a few steps: WeSaR against Small init at matched relative steps.

Under Adam every matrix moves by about lr per element, so its relative step is about lr / std(W):
WeSaR's actual weights have std sigma, Small init's sqrt(2 / (5d)). Small init therefore runs at
lr x sqrt(2 / (5d)) / sigma (3.61 x at d 768 with sigma^2 = 4e-5), WeSaR at the recipe's lr.
Both train ``yamls/paper/{small_init,wesar}-130m-rapid.yaml`` through llm-foundry's
``train`` (FSDP, meta init, bf16, as the recipe has it) on the demo dataset that
``wesar-data`` builds (vocabulary 4,096, 128-token samples instead of the paper's 32,000 and 2,048),
with the same seed and data order. For each run it prints the final training loss, the last
layer's d/u update-ratio gap (the median over logged steps of ||dW_d||/||W_d|| over
||dW_u||/||W_u||) and the largest attention logit on the last batch.

Run from the repository root on one GPU:
  python scripts/gpu_paper_case.py --data data/shakespeare-v4096-s128 --steps 100
On a CPU (a smoke of the same path, fp32, no FSDP):  ... --cpu --steps 3 --d-model 64 --n-layers 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIGMA_SQUARED = 4e-5  # the recipe's WeSaR sigma^2
LR = 1e-3  # the rapid recipe's lr


def overrides(data: Path, lr: float, out: Path, args) -> list[str]:
    """Command-line overrides of the paper YAML: the demo dataset, ``steps`` batches, console and in-memory logs."""
    items = [
        f'variables.data_local={data / "mds"}',
        f'variables.tokenizer_name={data / "tokenizer"}',
        f'variables.max_seq_len={args.seq_len}',
        f'model.vocab_size={args.vocab}',
        f'model.d_model={args.d_model}',
        f'model.n_layers={args.n_layers}',
        f'model.n_heads={max(1, args.d_model // 64)}',
        'model.attn_config.attn_impl=torch',  # flash-attn is not part of the stack
        'model.attn_config.rope_impl=hf',
        'model.loss_fn=torch_crossentropy',
        f'optimizer.lr={lr}',
        f'max_duration={args.steps}ba',
        'scheduler.t_warmup=10ba',
        'global_train_batch_size=64',
        'device_train_microbatch_size=64',
        'device_eval_batch_size=64',
        f'eval_interval={args.steps}ba',
        'eval_subset_num_batches=2',
        'train_loader.num_workers=1',
        'eval_loader.num_workers=1',
        'save_folder=null',
        'console_log_interval=10ba',
        'callbacks.update_ratio_monitor.log_interval=5',
    ]
    if args.cpu:
        items += ['precision=fp32', 'model.init_device=cpu']
    return items


def config(yaml: Path, data: Path, lr: float, out: Path, args):
    """The paper YAML with the overrides, its MLflow logger swapped for an in-memory one, and the loss recorder."""
    from omegaconf import OmegaConf

    from wesar_composer.tools.experiments.grid import RECORDER_CALLBACK

    cfg = OmegaConf.load(yaml)
    cfg.merge_with_dotlist(overrides(data, lr, out, args))
    cfg.loggers = {'inmemory': {}}
    del cfg.callbacks['memory_monitor']  # CUDA only; the speed and lr monitors stay
    cfg.callbacks[RECORDER_CALLBACK] = {'path': str(out / 'curve.json')}
    if args.cpu:
        del cfg['fsdp_config']
    return cfg


def d_over_u_last(trainer, n_layers: int) -> float:
    """Median over logged steps of the last layer's update ratio of W_d over that of W_u."""
    from composer.loggers import InMemoryLogger

    memory = next(lg for lg in trainer.logger.destinations if isinstance(lg, InMemoryLogger))
    last = n_layers - 1
    d = {t.batch.value: v for t, v in memory.data.get(f'update_ratio/L{last}/d', [])}
    u = {t.batch.value: v for t, v in memory.data.get(f'update_ratio/L{last}/u', [])}
    ratios = [float(d[t]) / float(u[t]) for t in d if t in u and float(u[t]) > 0]
    return statistics.median(ratios) if ratios else float('nan')


def run(method: str, lr: float, args) -> dict:
    import json

    from llmfoundry.command_utils import train

    out = args.out / method
    out.mkdir(parents=True, exist_ok=True)
    yaml = ROOT / 'yamls' / 'paper' / f'{method}-130m-rapid.yaml'
    trainer = train(config(yaml, args.data.resolve(), lr, out, args))
    record = json.loads((out / 'curve.json').read_text())
    losses = [x for x in record['loss'] if x is not None]
    result = {
        'method': method,
        'lr': lr,
        'first loss': losses[0] if losses else float('nan'),
        'last loss': statistics.fmean(losses[-5:]) if losses else float('nan'),
        'd/u last layer': d_over_u_last(trainer, args.n_layers),
        'max attention logit': record.get('max_attn_logit') or float('nan'),
    }
    trainer.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or '').split('\n\n')[0])
    parser.add_argument('--data', type=Path, default=ROOT / 'data' / 'shakespeare-v4096-s128')
    parser.add_argument('--out', type=Path, default=ROOT / 'runs' / 'gpu_paper_case')
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--d-model', type=int, default=768)
    parser.add_argument('--n-layers', type=int, default=12)
    parser.add_argument('--seq-len', type=int, default=128, help="the dataset's sample length")
    parser.add_argument('--vocab', type=int, default=4096, help="the dataset's vocabulary")
    parser.add_argument('--cpu', action='store_true', help='fp32 on the CPU, no FSDP: a smoke of the same path')
    args = parser.parse_args()
    if not (args.data / 'mds').is_dir():
        print(f'no dataset at {args.data}: build it with wesar-data', file=sys.stderr)
        return 2
    from llmfoundry import registry

    from wesar_composer.tools.experiments.grid import RECORDER_CALLBACK
    from wesar_composer.tools.experiments.run import LossRecorder

    if RECORDER_CALLBACK not in registry.callbacks:
        registry.callbacks.register(RECORDER_CALLBACK, func=LossRecorder)
    small_lr = LR * math.sqrt(2 / (5 * args.d_model)) / math.sqrt(SIGMA_SQUARED)
    rows = [run('small_init', small_lr, args), run('wesar', LR, args)]
    print(
        f'paper 130M recipe, d {args.d_model}, {args.n_layers} layers, {args.steps} steps of 64 x {args.seq_len} tokens'
    )
    print('| method | lr | first loss | last loss (mean of 5) | d/u last layer | max attention logit |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        print(
            f'| {r["method"]} | {r["lr"]:.3g} | {r["first loss"]:.3f} | {r["last loss"]:.3f} | '
            f'{r["d/u last layer"]:.2f} | {r["max attention logit"]:.1f} |'
        )
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
