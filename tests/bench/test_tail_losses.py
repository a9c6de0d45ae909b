"""bench/tail_losses.py: the bucket term equals the trainer's sparse loss; the exact fill equals dense KD."""

import math

import pytest
import torch

from bench.tail_losses import (
    cache_bigram,
    cache_unigram,
    group_tail_logprobs,
    tail_fill_kd_loss,
    vocab_groups,
)
from trainer.losses import LossOptions, dense_kd_loss, sparse_kd_loss


def _case(n=7, vocab=30, k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    t_logits = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 3
    t_lp = torch.log_softmax(t_logits, -1)
    ids = t_lp.topk(k, -1).indices
    top_lp = t_lp.gather(1, ids)
    tail = torch.logsumexp(t_lp.scatter(1, ids, -math.inf), -1)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[0] = ids[0, 1]  # one row whose target is a top-K id
    target_lp = t_lp.gather(1, targets[:, None])[:, 0]
    mask = torch.ones(n, dtype=torch.bool)
    mask[-1] = False
    return z, t_logits, t_lp, ids, top_lp, tail, targets, target_lp, mask


def _grad(fn, z):
    z = z.clone().requires_grad_(True)
    loss = fn(z)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_without_fill_equals_the_trainers_sparse_loss(with_target, alpha):
    z, _, _, ids, top_lp, tail, targets, target_lp, mask = _case()
    tlp = target_lp if with_target else None
    ours = _grad(lambda x: tail_fill_kd_loss(x, ids, top_lp, tail, targets, mask, alpha=alpha, target_logprob=tlp)[0], z)
    ref = _grad(lambda x: sparse_kd_loss(x, ids, top_lp, tail, targets, mask, LossOptions(alpha=alpha), target_logprob=tlp)[0], z)
    assert torch.allclose(ours[0], ref[0], atol=1e-10) and torch.allclose(ours[1], ref[1], atol=1e-10)


@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("num_groups", [1, 4])
def test_the_teachers_own_tail_as_fill_is_dense_kd(with_target, num_groups):
    """Buckets + sum_g P_g KL(p | B_g || q | B_g) = KL(p || q): the decomposition the candidates rest on."""
    z, t_logits, t_lp, ids, top_lp, tail, targets, target_lp, mask = _case()
    grouping = {}
    if num_groups > 1:
        groups = torch.arange(z.shape[1]) % num_groups
        grouping = {"groups": groups, "group_logprobs": group_tail_logprobs(t_lp, ids, groups, num_groups)}
    tlp = target_lp if with_target else None
    ours = _grad(lambda x: tail_fill_kd_loss(x, ids, top_lp, tail, targets, mask, alpha=0.2, target_logprob=tlp,
                                             prior=t_lp.exp(), **grouping)[0], z)
    ref = _grad(lambda x: dense_kd_loss(x, t_logits, targets, mask, LossOptions(alpha=0.2))[0], z)
    assert torch.allclose(ours[0], ref[0], atol=1e-10) and torch.allclose(ours[1], ref[1], atol=1e-10)


def test_a_wrong_prior_is_not_dense_kd():
    z, t_logits, _, ids, top_lp, tail, targets, _, mask = _case()
    ours = tail_fill_kd_loss(z, ids, top_lp, tail, targets, mask, prior=torch.ones(z.shape[1]))[0]
    assert not torch.allclose(ours, dense_kd_loss(z, t_logits, targets, mask)[0], atol=1e-3)


def test_groups_without_fill_are_a_finer_partition():
    """K + C buckets: KL between the partitions; between the K + 1 bucket KL and the dense KL."""
    z, t_logits, t_lp, ids, top_lp, tail, targets, _, mask = _case()
    groups = torch.arange(z.shape[1]) % 3
    grouped = tail_fill_kd_loss(z, ids, top_lp, tail, targets, mask, groups=groups,
                                group_logprobs=group_tail_logprobs(t_lp, ids, groups, 3))[0]
    coarse = tail_fill_kd_loss(z, ids, top_lp, tail, targets, mask)[0]
    assert coarse < grouped < dense_kd_loss(z, t_logits, targets, mask)[0]


def test_tail_target_fill_is_the_missing_term_in_expectation():
    """Averaged over y ~ p, the tail CE's gradient adds up with the buckets' to the dense KD gradient."""
    z, t_logits, t_lp, ids, top_lp, tail, _, _, _ = _case(n=1, vocab=12, k=3)
    mask = torch.ones(1, dtype=torch.bool)
    expected = torch.zeros_like(z)
    for y in range(z.shape[1]):
        _, g = _grad(lambda x, y=y: tail_fill_kd_loss(x, ids, top_lp, tail, torch.tensor([y]), mask,
                                                      tail_target_fill=True)[0], z)
        expected += t_lp[0, y].exp() * g
    _, dense = _grad(lambda x: dense_kd_loss(x, t_logits, torch.zeros(1, dtype=torch.long), mask)[0], z)
    assert torch.allclose(expected, dense, atol=1e-10)


def test_tail_target_fill_refuses_a_target_bucket():
    z, _, _, ids, top_lp, tail, targets, target_lp, mask = _case()
    with pytest.raises(ValueError, match="K \\+ 1 buckets"):
        tail_fill_kd_loss(z, ids, top_lp, tail, targets, mask, target_logprob=target_lp, tail_target_fill=True)


def test_vocab_groups_and_cache_unigram():
    head = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    groups = vocab_groups(head, 8)
    assert groups.shape == (200,) and set(groups.tolist()) == set(range(groups.max().item() + 1))
    assert groups.max().item() + 1 <= 8
    ids = torch.tensor([[0, 1], [1, 2]])
    prior = cache_unigram(ids, torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.1]])), 4)
    assert torch.allclose(prior, torch.tensor([0.5, 0.9, 0.1, 0.0], dtype=torch.float64) / 1.5)
    table = cache_bigram(torch.tensor([3, 3]), ids, torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.1]])), 4)
    assert torch.allclose(table[3], prior) and torch.allclose(table[0], prior)  # row 0: unseen, the unigram
    table = cache_bigram(torch.tensor([2, 3]), ids, torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.1]])), 4)
    assert torch.allclose(table[2], torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64))

