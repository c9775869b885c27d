"""Row-wise Adagrad for embedding and bias tables.

Online recommenders train their sparse tables with per-row adaptive steps (row-wise
Adagrad, as TorchRec/FBGEMM fuse it into the embedding backward; Adagrad/FTRL in
Monolith): each row keeps one accumulator, the running sum of its gradient's mean
square, and a step moves the row by ``lr * g / sqrt(acc)``. A row seen for the first
time takes a full-size step (its popularity is learned from a handful of
impressions); a row seen thousands of times takes small ones. Rows that a batch does
not touch do not move at all -- unlike Adam, whose momentum keeps moving a row long
after its last gradient.

The optimizer treats every parameter as a table of rows along its first dimension
(a scalar or a 1-D bias is a table of one-element rows). Its state is tensors only
(one ``acc`` per parameter), so it travels in a safetensors checkpoint.

>>> import torch
>>> table = torch.nn.Parameter(torch.zeros(4, 2))
>>> opt = RowWiseAdagrad([table], lr=0.5)
>>> table.grad = torch.tensor([[0., 0.], [1., -1.], [0., 0.], [0., 0.]])
>>> opt.step()
>>> table.data[1].tolist(), table.data[0].tolist()
([-0.5, 0.5], [0.0, 0.0])
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["RowWiseAdagrad"]


class RowWiseAdagrad(torch.optim.Optimizer):
    """Adagrad with one accumulator per row; updates only rows with a non-zero gradient.

    Parameters
    ----------
    params : iterable of tensors or param groups
    lr : float
        Step size of a row whose accumulated squared gradient equals this step's.
    eps : float
        Added to ``sqrt(acc)``.
    initial_accumulator : float
        Starting accumulator value (a larger value damps a new row's first steps).
    """

    def __init__(self, params: Iterable, lr: float = 0.05, eps: float = 1e-8,
                 initial_accumulator: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, but {lr} is given")
        if initial_accumulator < 0:
            raise ValueError(f"initial_accumulator must be >= 0, but {initial_accumulator} is given")
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator": initial_accumulator})

    @staticmethod
    def _rows(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("RowWiseAdagrad takes dense gradients (zero rows are skipped)")
                state = self.state[p]
                rows_p = self._rows(p)
                if "acc" not in state:
                    state["acc"] = torch.full((rows_p.shape[0],), float(group["initial_accumulator"]),
                                              dtype=torch.float32, device=p.device)
                grad = self._rows(p.grad).float()  # (rows, width)
                touched = grad.abs().sum(1).nonzero().squeeze(1)  # (k,)
                if touched.numel() == 0:
                    continue
                g = grad.index_select(0, touched)  # (k, width)
                acc = state["acc"]
                acc.index_add_(0, touched, g.pow(2).mean(1))
                step = g / (acc.index_select(0, touched).sqrt() + group["eps"]).unsqueeze(1)  # (k, width)
                rows_p.index_add_(0, touched, (-group["lr"] * step).to(p.dtype))
        return loss
