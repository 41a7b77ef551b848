"""Z-loss: weight * mean(logsumexp(logits)^2) added to the training loss (PaLM; the paper's Table 3)."""

from wesar_composer.algorithms.z_loss.z_loss import ZLoss, add_z_loss, loss_targets, z_loss

__all__ = ['ZLoss', 'add_z_loss', 'loss_targets', 'z_loss']
