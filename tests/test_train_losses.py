"""Preference losses, log-probabilities and the L1 term against numbers worked out by hand."""

import math

import pytest
import torch

from fsrl.train.losses import (LOSSES, dpo_loss, l1_coefficient, l1_penalty, mean_l0,
                               sequence_logps, simpo_loss)


def test_simpo_loss_matches_hand_computed_values():
    # pair 1: 10 * (-1.0 - -1.5) - 5 = 0            -> log 2
    # pair 2: 10 * (-2.0 - -1.0) - 5 = -15          -> log(1 + e^15)
    out = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), beta=10.0, gamma=5.0)
    torch.testing.assert_close(out.losses, torch.tensor([math.log(2.0), math.log1p(math.exp(15.0))]))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-10.0, -20.0]))
    assert out.accuracy.item() == 0.5


def test_simpo_small_beta_and_margin():
    # 2 * (-0.5 - -1.0) - 0.4 = 0.6 -> log(1 + e^-0.6) = 0.4374879...
    out = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=0.4)
    assert out.losses.item() == pytest.approx(0.43748795, abs=1e-6)


def test_dpo_loss_matches_hand_computed_value():
    # chosen: -10 - -11 = 1, rejected: -12 - -11 = -1; 0.5 * (1 - -1) = 1 -> log(1 + e^-1)
    out = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                   torch.tensor([-11.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(0.31326169, abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5]))


def test_dpo_with_policy_equal_to_reference_is_log_two():
    lp = torch.tensor([-3.0, -7.0])
    assert torch.allclose(dpo_loss(lp, lp + 1, lp, lp + 1).losses, torch.full((2,), math.log(2.0)))


def test_sequence_logps_scores_only_masked_tokens_from_previous_logits():
    # vocab 3; every position predicts probabilities [0.25, 0.5, 0.25]
    logits = torch.log(torch.tensor([1.0, 2.0, 1.0])).expand(1, 4, 3).clone()
    ids = torch.tensor([[0, 1, 2, 1]])
    mask = torch.tensor([[False, False, True, True]])     # score tokens 2 (p .25) and 1 (p .5)
    out = sequence_logps(logits, ids, mask)
    assert out.sum.item() == pytest.approx(math.log(0.25) + math.log(0.5), abs=1e-6)
    assert out.count.tolist() == [2]
    assert out.mean.item() == pytest.approx((math.log(0.25) + math.log(0.5)) / 2, abs=1e-6)


def test_sequence_logps_with_kept_tail_of_logits_equals_full():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g)
    ids = torch.randint(0, 5, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    full = sequence_logps(logits, ids, mask)
    tail = sequence_logps(logits[:, 1:], ids, mask, offset=1)
    torch.testing.assert_close(full.sum, tail.sum)
    with pytest.raises(ValueError):
        sequence_logps(logits[:, 3:], ids, mask, offset=3)   # token 2 of row 2 needs logits at 1


def test_l1_and_l0_average_over_real_tokens_only():
    v = torch.tensor([[[1.0, -2.0, 0.0], [0.0, 3.0, 0.0], [9.0, 9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])             # the third token is padding
    assert l1_penalty(v, mask).item() == pytest.approx((3.0 + 3.0) / 2)
    assert mean_l0(v, mask).item() == pytest.approx((2 + 1) / 2)


def test_l1_warmup_is_off_for_the_first_share_of_steps():
    coefs = [l1_coefficient(s, 10, 0.02, 0.2) for s in range(10)]
    assert coefs == [0.0, 0.0] + [0.02] * 8
    assert l1_coefficient(0, 10, 0.02, 0.0) == 0.02


def test_loss_registry_defaults():
    assert LOSSES["simpo"].default_beta == 10.0 and LOSSES["simpo"].length_normalised
    assert LOSSES["dpo"].needs_reference and not LOSSES["dpo"].length_normalised
