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

from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["RowWiseAdagrad", "optimizer_tensors", "load_optimizer_tensors"]


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


def _param_names(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> list[str]:
    """The name of each parameter in the order of ``optimizer.state_dict()``'s indices."""
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: Mapping[int, str], prefix: str) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as ``{"{prefix}/{param name}/{key}": tensor}``
    (Adam: ``step``, ``exp_avg``, ``exp_avg_sq``; :class:`RowWiseAdagrad`: ``acc``),
    keyed by parameter name rather than position; ``names`` maps ``id(param)`` to its
    name. Hyper-parameters are not saved (they come from the learner's config).

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.Adam([w], lr=0.1)
    >>> w.grad = torch.ones(2); opt.step()
    >>> sorted(optimizer_tensors(opt, {id(w): "w"}, "adam"))
    ['adam/w/exp_avg', 'adam/w/exp_avg_sq', 'adam/w/step']
    """
    order = _param_names(optimizer, names)
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{prefix}/{order[index]}/{key}"] = tensor.detach().to("cpu").contiguous().clone()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: Mapping[int, str], prefix: str,
                           tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore :func:`optimizer_tensors` output (the entries under ``prefix``); the
    optimizer's hyper-parameters stay as they are. Parameters absent from ``tensors``
    get no state (as before their first step); a name the optimizer does not hold
    raises ``ValueError``."""
    order: Sequence[str] = _param_names(optimizer, names)
    index = {name: n for n, name in enumerate(order)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for full, value in tensors.items():
        if not full.startswith(prefix + "/"):
            continue
        name, _, key = full[len(prefix) + 1 :].rpartition("/")
        if name not in index:
            raise ValueError(f"optimizer state for {name!r}, which this optimizer does not train")
        state.setdefault(index[name], {})[key] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
