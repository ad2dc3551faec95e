"""Offline FSRL training: preference losses, preference data, and the trainer behind `fsrl train`."""

from fsrl.train.losses import LOSSES, dpo_loss, l1_penalty, mean_l0, sequence_logps, simpo_loss

__all__ = ["LOSSES", "dpo_loss", "l1_penalty", "mean_l0", "sequence_logps", "simpo_loss"]
