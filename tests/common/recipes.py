"""Command-line overrides that scale a paper recipe (yamls/paper/) down to a CPU run on the tiny data."""

from __future__ import annotations

from wesar_composer.tools.data import DatasetPaths

__all__ = ['tiny_recipe_overrides']


def tiny_recipe_overrides(
    data: DatasetPaths, *extra: str, microbatch: int, max_duration: str, eval_interval: str
) -> list[str]:
    """``train_from_yaml`` overrides: a tiny MPT (d 64, 2 layers, CPU kernels, fp32) on ``data``, batches of 8
    in microbatches of ``microbatch``, the monitor at every batch; the recipe's algorithms, callbacks,
    optimizer and schedule shape as written. ``extra`` overrides follow."""
    return [
        f'variables.data_local={data.mds}',
        f'variables.tokenizer_name={data.tokenizer}',
        f'variables.max_seq_len={data.seq_len}',
        'save_folder=null',
        'python_log_level=null',
        'model.d_model=64',
        'model.n_heads=2',
        'model.n_layers=2',
        f'model.vocab_size={data.vocab_size}',
        'model.init_device=cpu',
        'model.attn_config.attn_impl=torch',
        'model.attn_config.rope_impl=hf',
        'model.loss_fn=torch_crossentropy',
        'precision=fp32',
        'fsdp_config=null',
        'global_train_batch_size=8',
        f'device_train_microbatch_size={microbatch}',
        'device_eval_batch_size=8',
        f'max_duration={max_duration}',
        'scheduler.t_warmup=1ba',
        f'eval_interval={eval_interval}',
        'eval_subset_num_batches=1',
        'callbacks.update_ratio_monitor.log_interval=1',
        *[
            f'{loader}.{key}={value}'
            for loader in ('train_loader', 'eval_loader')
            for key, value in (('num_workers', 0), ('prefetch_factor', 'null'), ('persistent_workers', 'false'))
        ],
        *extra,
    ]
