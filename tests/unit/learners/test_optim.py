import torch

from learners.optim import RowWiseAdagrad


def test_only_touched_rows_move_and_steps_shrink_per_row():
    table = torch.nn.Parameter(torch.zeros(5, 3))
    bias = torch.nn.Parameter(torch.zeros(()))
    opt = RowWiseAdagrad([table, bias], lr=0.1)
    moves = []
    for _ in range(3):
        opt.zero_grad()
        before = table.detach().clone()
        (table[[1, 3]].sum() + 2 * bias).backward()
        opt.step()
        moves.append((table.detach() - before).abs())
    # Untouched rows never move; no momentum carries them along later.
    assert moves[-1][[0, 2, 4]].abs().sum() == 0 and table[[0, 2, 4]].abs().sum() == 0
    # A constant gradient gives steps lr / sqrt(t): 0.1, 0.0707, 0.0577.
    torch.testing.assert_close(torch.stack([m[1, 0] for m in moves]),
                               torch.tensor([0.1, 0.1 / 2 ** 0.5, 0.1 / 3 ** 0.5]))
    assert bias.item() < 0 and torch.isfinite(bias)
    state = opt.state_dict()["state"]
    assert all(set(s) == {"acc"} and s["acc"].dim() == 1 for s in state.values())  # tensors only: safetensors-ready
    assert state[0]["acc"].shape == (5,) and state[0]["acc"][[0, 2, 4]].sum() == 0


def test_rejects_bad_settings_and_sparse_gradients():
    import pytest

    with pytest.raises(ValueError, match="lr must be > 0"):
        RowWiseAdagrad([torch.nn.Parameter(torch.zeros(2))], lr=0)
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="dense gradients"):
        RowWiseAdagrad(emb.parameters()).step()
