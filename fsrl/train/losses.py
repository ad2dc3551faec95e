"""Preference losses and the log-probability helper they read, as pure functions.

Every loss takes already-reduced log-probabilities of the chosen and rejected responses, one
number per pair, and returns per-pair losses and the implicit rewards (TRL's `cpo_loss` /
`dpo_loss` shape). The L1 penalty on the steering vector and its warm-up live here too.

    SimPO (Meng et al. 2024, eq. 6):  r(y) = mean_t log p(y_t | x, y_<t)        (response tokens)
        L = -log sigmoid(beta * (r(y_w) - r(y_l)) - gamma)
    DPO (Rafailov et al. 2023, eq. 7): r(y) = sum_t log p(y_t | ...) - sum_t log p_ref(y_t | ...)
        L = -log sigmoid(beta * (r(y_w) - r(y_l)))
    FSRL (arXiv 2509.12934): loss + lambda * mean_tokens ||v||_1, lambda = 0 during the warm-up.

The losses are resolved once from their name through `LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SequenceLogps:
    """Per-sequence log-probabilities of the response tokens."""

    sum: torch.Tensor       # (N,) sum over response tokens of log p(y_t | x, y_<t)
    count: torch.Tensor     # (N,) number of response tokens

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)                          # (N,)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   offset: int = 0) -> SequenceLogps:
    """Log-probabilities of the response tokens of each sequence.

    logits: (N, K, V), the model's logits for positions offset .. offset + K - 1 (a model run
    with `logits_to_keep` returns the last K positions: offset = T - K); input_ids: (N, T);
    response_mask: (N, T) bool, True at the tokens whose log-probability counts. Token t is
    scored by the logits at t - 1, so a mask bit at t needs offset <= t - 1.
    """
    N, K, _ = logits.shape
    targets = input_ids[:, offset + 1: offset + K + 1]                     # (N, K') next tokens
    mask = response_mask[:, offset + 1: offset + K + 1]                    # (N, K')
    logits = logits[:, : targets.shape[1]].float()                         # (N, K', V)
    # gather - logsumexp: no full log_softmax tensor kept for the backward pass.
    token_logps = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (N, K')
    token_logps = token_logps.masked_fill(~mask, 0.0)
    missed = response_mask[:, : offset + 1].sum()
    if int(missed):
        raise ValueError(f"{int(missed)} response token(s) lie before the kept logits (offset {offset})")
    return SequenceLogps(sum=token_logps.sum(-1), count=mask.sum(-1))


@dataclass
class PreferenceLoss:
    losses: torch.Tensor            # (B,) per-pair loss
    chosen_rewards: torch.Tensor    # (B,) detached implicit rewards, for accuracy and margins
    rejected_rewards: torch.Tensor  # (B,)

    @property
    def accuracy(self) -> torch.Tensor:
        """Share of pairs whose chosen response out-scores the rejected one: ()"""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 10.0,
               gamma: float = 5.0) -> PreferenceLoss:
    """SimPO: -log sigmoid(beta * (r_w - r_l) - gamma), r = length-normalised log-probability.

    chosen_logps, rejected_logps: (B,) mean log-probability per response token.
    gamma is the target reward margin (TRL's `simpo_gamma`); SimPO's paper quotes gamma / beta.
    """
    logits = beta * (chosen_logps - rejected_logps) - gamma                    # (B,)
    return PreferenceLoss(losses=-F.logsigmoid(logits),
                          chosen_rewards=(beta * chosen_logps).detach(),
                          rejected_rewards=(beta * rejected_logps).detach())


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> PreferenceLoss:
    """DPO: -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))).

    All inputs: (B,) summed log-probabilities of the response tokens, under the policy and under
    the reference (for FSRL: the same model with steering off).
    """
    chosen = chosen_logps - ref_chosen_logps                                   # (B,)
    rejected = rejected_logps - ref_rejected_logps                             # (B,)
    return PreferenceLoss(losses=-F.logsigmoid(beta * (chosen - rejected)),
                          chosen_rewards=(beta * chosen).detach(),
                          rejected_rewards=(beta * rejected).detach())


def l1_penalty(v: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of ||v||_1.

    v: (N, T, d_sae); token_mask: (N, T) bool, False at padding. Returns ().
    """
    per_token = v.abs().sum(-1)                                                # (N, T)
    return (per_token * token_mask).sum() / token_mask.sum().clamp(min=1)


def mean_l0(v: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of the number of non-zero entries of v: ()."""
    per_token = (v != 0).sum(-1).float()                                       # (N, T)
    return (per_token * token_mask).sum() / token_mask.sum().clamp(min=1)


def l1_coefficient(step: int, total_steps: int, coefficient: float, warmup: float) -> float:
    """The L1 coefficient at optimiser step `step` (0-based): 0 for the first `warmup` share of
    the steps, then `coefficient`."""
    return 0.0 if step < warmup * total_steps else coefficient


@dataclass(frozen=True)
class LossSpec:
    """How one preference loss reads the log-probabilities, and its default beta."""

    name: str
    default_beta: float
    length_normalised: bool         # SimPO: mean log-prob per token; DPO: sum
    needs_reference: bool           # DPO: log-probs with steering off
    fn: Callable[..., PreferenceLoss]

    def __call__(self, policy: tuple[torch.Tensor, torch.Tensor],
                 reference: tuple[torch.Tensor, torch.Tensor] | None,
                 beta: float, gamma: float) -> PreferenceLoss:
        if self.needs_reference:
            assert reference is not None, f"{self.name} needs reference log-probabilities"
            return self.fn(*policy, *reference, beta=beta)
        return self.fn(*policy, beta=beta, gamma=gamma)


LOSSES: dict[str, LossSpec] = {
    "simpo": LossSpec("simpo", 10.0, length_normalised=True, needs_reference=False, fn=simpo_loss),
    "dpo": LossSpec("dpo", 0.1, length_normalised=False, needs_reference=True, fn=dpo_loss),
}
