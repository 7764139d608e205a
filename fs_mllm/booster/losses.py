"""The booster's training losses (DESIGN section 3): feature cosine, the mapper's statistics matching and identity."""


from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F



def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image cosine of flattened features (global mode), float32."""
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1, eps=1e-8)


def stats_matching_loss(mapped: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-dimension mean/std of mapped features vs clean features (pooled over batch and tokens)."""
    m = mapped.float().reshape(-1, mapped.shape[-1])
    c = clean.float().reshape(-1, clean.shape[-1])
    c_std = c.std(0) + 1e-4
    mean_term = ((m.mean(0) - c.mean(0)) / c_std).pow(2).mean()
    std_term = (torch.log(m.std(0) + 1e-4) - torch.log(c_std)).pow(2).mean()
    return mean_term + std_term


def identity_loss(booster_mapper: nn.Module, clean: torch.Tensor) -> torch.Tensor:
    """||M(z, 0)||^2 relative to ||z||^2: the mapper must leave noise-free features alone."""
    zero = torch.zeros(clean.shape[0], device=clean.device)
    residual = booster_mapper.residual(clean, zero) if hasattr(booster_mapper, "residual") else booster_mapper(clean, zero) - clean.float()
    return (residual.float().pow(2).flatten(1).sum(1) / clean.float().pow(2).flatten(1).sum(1).clamp_min(1e-8)).mean()
