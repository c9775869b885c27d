import math

import numpy as np
import pytest
import torch

from em3.model.losses import content_id_infonce, weighted_bce, within_group_bpr


def _reference_infonce(c, e, tau, neg=None, same=None):
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(c)):
        terms = []
        for j in range(len(e)):
            if same is not None and j != i and same[i, j]:
                continue
            terms.append(math.exp(float(c[i] @ e[j]) / tau))
        if neg is not None:
            for k in range(len(neg)):
                nk = neg[k] / np.linalg.norm(neg[k])
                terms.append(math.exp(float(c[i] @ nk) / tau))
        total += -math.log(math.exp(float(c[i] @ e[i]) / tau) / sum(terms))
    return total / len(c)


def test_infonce_matches_hand_computation():
    g = np.random.default_rng(0)
    c, e, neg = g.normal(size=(5, 4)), g.normal(size=(5, 4)), g.normal(size=(3, 4))
    same = np.zeros((5, 5), dtype=bool)
    same[0, 3] = same[3, 0] = True
    for kwargs, ref in [
        ({}, _reference_infonce(c, e, 0.2)),
        ({"negatives": torch.tensor(neg)}, _reference_infonce(c, e, 0.2, neg)),
        ({"same_id": torch.tensor(same)}, _reference_infonce(c, e, 0.2, same=same)),
    ]:
        got = content_id_infonce(torch.tensor(c), torch.tensor(e), 0.2, **kwargs)
        assert abs(float(got) - ref) < 1e-9


def test_infonce_edge_cases_and_gradients():
    assert float(content_id_infonce(torch.randn(1, 4), torch.randn(1, 4), 0.1)) == 0.0
    c = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: content_id_infonce(a, b, 0.3), (c, e))
    aligned = content_id_infonce(e.detach(), e.detach(), 0.1)
    assert float(aligned) < float(content_id_infonce(c.detach(), e.detach(), 0.1))


def test_weighted_bce_and_corrections():
    z = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0])
    w = torch.tensor([1.0, 2.0, 0.5])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    torch.testing.assert_close(weighted_bce(z, y, w), (plain * w).mean())
    corr = torch.tensor([False, False, True])
    torch.testing.assert_close(weighted_bce(z, y, None, corr, "positive"), plain.mean())
    loss = weighted_bce(z, y, None, corr, "cancel")
    loss.backward()
    # The correction sample's gradient w.r.t. its logit is exactly -1 (per-sample, before the mean).
    assert abs(float(z.grad[2]) * 3 + 1.0) < 1e-6


def test_within_group_bpr_pairs_only_within_a_group_and_ignores_group_offsets():
    """Pairs are (clicked, unclicked) of the same group; a per-group offset leaves the
    loss unchanged; the gradient raises the clicked row and lowers the unclicked one."""
    z = torch.tensor([1.0, -0.5, 3.0, 0.2, 0.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 2])
    loss = within_group_bpr(z, y, g)
    # Pairs: (0, 1) in group 0; (3, 2) in group 1; group 2 has no click.
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(2.8))) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    shifted = z.detach() + torch.tensor([5.0, 5.0, -3.0, -3.0, 7.0])
    assert float(within_group_bpr(shifted, y, g)) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert z.grad[0] < 0 < z.grad[1] and z.grad[3] < 0 < z.grad[2] and z.grad[4] == 0
    none = within_group_bpr(z, y, torch.arange(5))  # every row its own group: no pair
    assert float(none.detach()) == 0.0 and none.requires_grad
