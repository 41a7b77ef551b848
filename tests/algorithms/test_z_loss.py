"""Z-loss: value and gradient against a direct computation, masking, Trainer logging, bad weights."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Event
from composer.loggers import InMemoryLogger
from llmfoundry.utils.builders import build_algorithm
from torch.utils.data import DataLoader

from tests.common import llama, mpt
from wesar_composer import ZLoss
from wesar_composer.algorithms.z_loss import z_loss

IGNORE = -100
WEIGHT = 1e-4
VOCAB = 256


def batch_with_padding(seed=0, batch=3, seq=24):
    """Token ids with labels; the second row ends in 7 padding positions (label -100)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = input_ids.clone()
    attention_mask = torch.ones_like(input_ids)
    labels[1, -7:] = IGNORE
    attention_mask[1, -7:] = 0
    return {'input_ids': input_ids, 'labels': labels, 'attention_mask': attention_mask}


def direct_loss(logits, labels, weight):
    """Cross-entropy plus weight * mean (log sum exp)^2 over positions t with a target labels[t + 1]."""
    logits = logits[:, :-1].double()
    targets = labels[:, 1:]
    counted = targets != IGNORE
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    log_z = logits.exp().sum(-1).log()  # written out, not torch.logsumexp
    z = weight * (log_z[counted] ** 2).sum() / counted.sum()
    return ce, z


@pytest.mark.parametrize('family', ['mpt', 'llama'])
def test_value_and_gradient_match_direct_computation(family, tmp_path):
    torch.manual_seed(0)
    model = (
        mpt(d_model=64, n_heads=2, n_layers=2, vocab_size=VOCAB)
        if family == 'mpt'
        else llama(tmp_path, d_model=64, n_heads=2, kv_heads=1, n_layers=2, vocab_size=VOCAB)
    )
    batch = batch_with_padding()
    params = [p for p in model.parameters() if p.requires_grad]

    outputs = model(batch)
    state = SimpleNamespace(model=model, outputs=outputs, batch=batch, loss=model.loss(outputs, batch))
    ZLoss(WEIGHT).apply(Event.AFTER_LOSS, state, None)
    assert set(state.loss) == {'total', 'loss', 'z_loss'}
    grads = torch.autograd.grad(state.loss['total'], params)

    ce, z = direct_loss(model(batch).logits, batch['labels'], WEIGHT)
    direct_grads = torch.autograd.grad(ce + z, params)

    assert z.item() > 1e-3  # log Z ~ log(256) at init: the term is not negligible at this weight
    assert state.loss['z_loss'].item() == pytest.approx(z.item(), rel=1e-5)
    assert state.loss['loss'].item() == pytest.approx(ce.item(), rel=1e-5)
    assert state.loss['total'].item() == pytest.approx((ce + z).item(), rel=1e-5)
    for g, d in zip(grads, direct_grads):
        torch.testing.assert_close(g, d.to(g.dtype), rtol=1e-4, atol=1e-7)


def test_gradient_wrt_logits_is_two_log_z_softmax_on_counted_positions_only():
    """d/dlogits of mean (log Z)^2 = 2 log Z softmax / count at counted positions, 0 elsewhere."""
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_()
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, 3:] = IGNORE
    z_loss(logits, targets).backward()
    counted = targets != IGNORE
    log_z = torch.logsumexp(logits.detach(), -1, keepdim=True)
    expected = 2 * log_z * torch.softmax(logits.detach(), -1) / counted.sum() * counted.unsqueeze(-1)
    torch.testing.assert_close(logits.grad, expected)
    assert logits.grad[0, 3:].abs().max() == 0


def test_all_positions_ignored_gives_zero():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    z = z_loss(logits, torch.full((2, 4), IGNORE))
    z.backward()
    assert z.item() == 0 and torch.isfinite(logits.grad).all()


def test_bf16_logits_are_reduced_in_float32():
    logits = 8 * torch.randn(4, 16, 1000)
    exact = (torch.logsumexp(logits.double(), -1) ** 2).mean()
    assert z_loss(logits.bfloat16()).dtype == torch.float32
    assert z_loss(logits.bfloat16()).item() == pytest.approx(exact.item(), rel=1e-2)


def test_trainer_backpropagates_and_logs_the_sum(tmp_path):
    """In a Composer Trainer (two microbatches per batch) the loss dict is total = loss + z_loss."""
    torch.manual_seed(0)
    model = mpt(d_model=64, n_heads=2, n_layers=2, vocab_size=VOCAB, max_seq_len=32)
    ids = torch.randint(0, VOCAB, (8, 32))
    data = [{'input_ids': x, 'labels': x.clone(), 'attention_mask': torch.ones_like(x)} for x in ids]
    loader = DataLoader(data, batch_size=4)
    memory = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration='2ba',
        algorithms=[build_algorithm('z_loss', {'weight': WEIGHT})],
        loggers=[memory],
        device_train_microbatch_size=2,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        progress_bar=False,
        device='cpu',
    )
    trainer.fit()
    total = [v for _, v in memory.data['loss/train/total']]
    lm = [v for _, v in memory.data['loss/train/loss']]
    z = [v for _, v in memory.data['loss/train/z_loss']]
    assert len(z) == 2
    for t, lm_loss, zz in zip(total, lm, z):
        assert 0.5 * WEIGHT * math.log(VOCAB) ** 2 < zz < 2 * WEIGHT * math.log(VOCAB) ** 2
        assert t == pytest.approx(lm_loss + zz, rel=1e-6)
    trainer.close()


@pytest.mark.parametrize('bad', [0, -1e-4, float('nan'), float('inf'), '1e-4', True, None])
def test_bad_weight_is_refused(bad):
    with pytest.raises(ValueError, match='z_loss weight must be a positive finite number'):
        ZLoss(bad)


def test_registered_for_llmfoundry():
    algorithm = build_algorithm('z_loss', {})
    assert isinstance(algorithm, ZLoss) and algorithm.weight == WEIGHT
    assert repr(algorithm) == 'ZLoss(weight=0.0001)'
