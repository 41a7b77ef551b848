"""What the benchmarks share: the paper's model shapes, its MPT, random token batches, one timed step.

The benchmarks run as scripts (``python benchmarks/x.py``), which puts this folder first on
``sys.path``: they import this module as ``common``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

import torch

SHAPES = {
    '130m': dict(d_model=768, n_heads=12, n_layers=12),
    '1.3b': dict(d_model=2048, n_heads=16, n_layers=24),
}  # Table 2
VOCAB_SIZE = 32000


def paper_mpt(shape: str, seq_len: int, attn_impl: str = 'torch', **config):
    """llm-foundry's MPT in the paper's shape ``shape``: FFN 4d gelu, RMSNorm, RoPE, no bias, untied, vocab 32000.

    Built on the CPU; ``config`` adds or replaces keyword arguments of ``ComposerMPTCausalLM``.
    """
    from llmfoundry.models.mpt import ComposerMPTCausalLM

    return ComposerMPTCausalLM(
        **{
            **SHAPES[shape],
            'expansion_ratio': 4,
            'max_seq_len': seq_len,
            'vocab_size': VOCAB_SIZE,
            'no_bias': True,
            'norm_type': 'rmsnorm',
            'attn_config': {'attn_impl': attn_impl, 'rope': True, 'rope_impl': 'hf'},
            'ffn_config': {'ffn_type': 'mptmlp', 'ffn_act_fn': {'name': 'gelu'}},
            'tie_word_embeddings': False,
            'loss_fn': 'torch_crossentropy',
            'init_device': 'cpu',
            **config,
        }
    )


def make_batch(batch_size: int, seq_len: int, device: str) -> dict[str, torch.Tensor]:
    """Random tokens of the paper's vocabulary, with labels and an attention mask."""
    tokens = torch.randint(0, VOCAB_SIZE, (batch_size, seq_len), device=device)
    return {'input_ids': tokens, 'labels': tokens.clone(), 'attention_mask': torch.ones_like(tokens)}


def timed_step(
    model,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    device: str,
    zero_grad: bool = True,
    before_forward: Optional[Callable[[torch.nn.Module], object]] = None,
) -> float:
    """Seconds of one training step (zero_grad, forward and loss under bf16 autocast on CUDA, backward, step)."""
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    if before_forward is not None:
        before_forward(model)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == 'cuda'):
        loss = model.loss(model(batch), batch)
    loss.backward()
    optimizer.step()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start
