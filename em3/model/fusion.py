"""Fusion-Q-Former: K learned queries read the tokens of every modality.

Each layer runs query self-attention, cross-attention from the queries to the
concatenated modality tokens (each tagged with a learned modality-type embedding;
padding and missing modalities masked out), and a feed-forward block, all pre-norm
with residuals (the shape of BLIP-2's Q-Former, much smaller). The ``K x d`` query
outputs are flattened and projected to the item's ``d``-wide content embedding.

One learned "null" token is always present and never masked, so an item with every
modality missing still gets a well-defined embedding (and attention never sees an
all-masked row, which would give NaN).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ModalityTokens", "FusionQFormer", "MeanFusion"]


class ModalityTokens(nn.Module):
    """Project each modality's tokens to ``d``, add type embeddings, concatenate.

    Call Args: ``tokens[m]`` ``(N, T_m, H_m)`` and ``masks[m]`` ``(N, T_m)`` bool
    (True at real tokens; all False for an item missing modality ``m``).
    Returns ``memory`` ``(N, 1 + sum T_m, d)`` and ``valid`` ``(N, 1 + sum T_m)``,
    the first position being the null token.
    """

    def __init__(self, in_dims: Sequence[int], d: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(h, d) for h in in_dims])
        self.type_emb = nn.Parameter(torch.randn(len(in_dims) + 1, d) * 0.02)  # last row: null token
        self.null = nn.Parameter(torch.randn(d) * 0.02)
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n = masks[0].shape[0] if masks else 0
        parts = [(self.null + self.type_emb[-1]).expand(n, 1, -1)]  # (N, 1, d)
        valid = [torch.ones(n, 1, dtype=torch.bool, device=self.null.device)]
        for m, (x, mask) in enumerate(zip(tokens, masks)):
            parts.append(self.proj[m](x) + self.type_emb[m])  # (N, T_m, d)
            valid.append(mask)
        memory = self.norm(torch.cat(parts, dim=1))  # (N, T, d)
        return memory, torch.cat(valid, dim=1)  # (N, T, d), (N, T)


class _QFormerLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn_mult: int = 2) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm_c = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm_f = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor,
                weights_out: list | None = None) -> torch.Tensor:
        h = self.norm_q(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]  # (N, K, d)
        h = self.norm_c(q)
        want = weights_out is not None
        out, weights = self.cross_attn(h, memory, memory, key_padding_mask=~valid, need_weights=want)
        if want:
            weights_out.append(weights)  # (N, K, T), averaged over heads
        q = q + out  # (N, K, d)
        return q + self.ffn(self.norm_f(q))  # (N, K, d)


def pooled_tokens(tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(N, sum H_m)``: each modality's masked mean token, concatenated (zeros for an
    item missing the modality): what a sentence encoder's mean pooling gives."""
    out = []
    for x, mask in zip(tokens, masks):
        w = mask.to(x.dtype).unsqueeze(-1)  # (N, T_m, 1)
        out.append((x * w).sum(1) / w.sum(1).clamp(min=1.0))  # (N, H_m)
    return torch.cat(out, dim=-1)


class FusionQFormer(nn.Module):
    """K queries x L layers over all modality tokens -> content embedding ``(N, d)``.

    With ``pooled_skip``, a linear map of each modality's mean-pooled encoder output
    (:func:`pooled_tokens`, layer-normalised) is added to the queries' projection. The
    queries start random, so at the start they read every token about equally and mix
    them through random layers; the pooled path carries what the pretrained encoders
    already know (a sentence encoder is trained for mean pooling) from the first
    request. The queries' projection then starts at zero (as a residual branch
    does) and learns what to add to the summary.
    """

    def __init__(self, in_dims: Sequence[int], d: int, query_num: int, layers: int, heads: int,
                 pooled_skip: bool = False) -> None:
        super().__init__()
        self.tokens = ModalityTokens(in_dims, d)
        self.queries = nn.Parameter(torch.randn(query_num, d) * 0.02)
        self.layers = nn.ModuleList([_QFormerLayer(d, heads) for _ in range(layers)])
        self.out_norm = nn.LayerNorm(d)
        self.out = nn.Linear(query_num * d, d)
        self.pooled: nn.Module | None = None
        if pooled_skip:
            self.pooled = nn.Sequential(nn.LayerNorm(sum(in_dims)), nn.Linear(sum(in_dims), d))
            # The queries' part starts at zero and learns what to add to the summary.
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def query_outputs(self, tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                      weights_out: list | None = None) -> torch.Tensor:
        """The ``K`` query outputs ``(N, K, d)``; each layer's cross-attention weights
        ``(N, K, T)`` are appended to ``weights_out`` when one is given."""
        memory, valid = self.tokens(tokens, masks)  # (N, T, d), (N, T)
        q = self.queries.expand(memory.shape[0], -1, -1)  # (N, K, d)
        for layer in self.layers:
            q = layer(q, memory, valid, weights_out)
        return self.out_norm(q)  # (N, K, d)

    def forward(self, tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
        q = self.query_outputs(tokens, masks)  # (N, K, d)
        out = self.out(q.flatten(1))  # (N, d)
        if self.pooled is not None:
            out = out + self.pooled(pooled_tokens(tokens, masks))
        return out

    def _read_with_mass(self, tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query outputs ``(N, K, d)`` and their attention mass ``(N, 1 + M)``, in one pass."""
        weights: list[torch.Tensor] = []
        q = self.query_outputs(tokens, masks, weights)
        w = torch.stack(weights).mean(0).mean(1)  # (N, T)
        bounds = [0, 1] + [m.shape[1] for m in masks]
        edges = torch.tensor(bounds).cumsum(0).tolist()
        return q, torch.stack([w[:, a:b].sum(1) for a, b in zip(edges[:-1], edges[1:])], dim=1)  # (N, 1 + M)

    @torch.no_grad()
    def attention_mass(self, tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(N, 1 + M)``: the share of the queries' cross-attention (all layers, heads
        and queries averaged) on the null token and on each of the ``M`` modalities:
        which modality the queries read."""
        return self._read_with_mass(tokens, masks)[1]

    @torch.no_grad()
    def modality_share(self, tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(N, 1 + M)``: how much of the content embedding each modality accounts for,
        the null token ("missing") first. Without the pooled skip, the attention mass.
        With it, the queries' part counts by its attention mass and the pooled part by
        each modality's term, each weighted by the norm of what it adds to the
        embedding; the term of an absent modality (the layer norm gives its empty slot
        a value) counts as missing. Rows sum to 1."""
        q, mass = self._read_with_mass(tokens, masks)  # (N, K, d), (N, 1 + M)
        if self.pooled is None:
            return mass
        queries = self.out(q.flatten(1)).norm(dim=-1)  # (N,)
        share = mass * queries.unsqueeze(-1)  # (N, 1 + M)
        layer_norm, linear = self.pooled[0], self.pooled[1]
        x = layer_norm(pooled_tokens(tokens, masks))  # (N, sum H_m)
        start = 0
        for m, (t, mask) in enumerate(zip(tokens, masks)):
            end = start + t.shape[-1]
            term = (x[:, start:end] @ linear.weight[:, start:end].T).norm(dim=-1)  # (N,)
            present = mask.any(1)
            share[:, 1 + m] += torch.where(present, term, torch.zeros_like(term))
            share[:, 0] += torch.where(present, torch.zeros_like(term), term)
            start = end
        total = share.sum(1, keepdim=True)  # (N, 1)
        return torch.where(total > 0, share / total.clamp(min=1e-12), mass)  # nothing added: the attention


class MeanFusion(nn.Module):
    """The ``no_fusion`` ablation: masked mean of all projected tokens, then a linear map."""

    def __init__(self, in_dims: Sequence[int], d: int) -> None:
        super().__init__()
        self.tokens = ModalityTokens(in_dims, d)
        self.out = nn.Linear(d, d)

    def forward(self, tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
        memory, valid = self.tokens(tokens, masks)  # (N, T, d), (N, T)
        w = valid.to(memory.dtype).unsqueeze(-1)  # (N, T, 1)
        pooled = (memory * w).sum(1) / w.sum(1)  # (N, d)
        return self.out(pooled)  # (N, d)
