"""Token data for Composer Trainers and plain forward passes: random sequences with labels."""

from __future__ import annotations

import torch

__all__ = ['TokenBatches', 'token_batch']


class TokenBatches(torch.utils.data.Dataset):
    """``n`` random token sequences with labels, as llm-foundry's collator yields them (one seed, fixed)."""

    def __init__(self, n: int = 64, seq: int = 32, vocab: int = 512, seed: int = 0):
        self.tokens = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.tokens[i]
        return {'input_ids': t, 'labels': t.clone(), 'attention_mask': torch.ones_like(t)}


def token_batch(seed: int = 0, batch: int = 4, seq: int = 32, vocab: int = 256) -> dict[str, torch.Tensor]:
    """One collated batch of ``batch`` random sequences (``input_ids``, ``labels``, ``attention_mask``)."""
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {'input_ids': tokens, 'labels': tokens.clone(), 'attention_mask': torch.ones_like(tokens)}
