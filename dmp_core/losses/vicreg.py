"""VICReg on matched image/text embeddings (METHOD.md 4.4), fp32, DDP-aware."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dmp_core.losses.distributed import gather_with_grad


def _variance(z: torch.Tensor) -> torch.Tensor:
    std = torch.sqrt(z.var(dim=0) + 1e-4)
    return F.relu(1.0 - std).mean()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    n, d = z.shape
    zc = z - z.mean(dim=0)
    cov = (zc.t() @ zc) / (n - 1)
    off_diagonal = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
    return off_diagonal / d


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0) -> dict[str, torch.Tensor]:
    """``{"sim", "std", "cov", "loss"}``: invariance = mean squared difference over n*d;
    variance = mean_j relu(1 - sqrt(var_j + 1e-4)) averaged over the two inputs;
    covariance = sum_{i!=j} C_ij^2 / d summed over the two inputs (C divided by n-1);
    loss = sim_coeff*sim + std_coeff*std + cov_coeff*cov. Under DDP the statistics use
    the global batch (gathered with gradients)."""
    a = gather_with_grad(z_a).float()
    b = gather_with_grad(z_b).float()
    sim = F.mse_loss(a, b)
    std = (_variance(a) + _variance(b)) / 2
    cov = _covariance(a) + _covariance(b)
    return {"sim": sim, "std": std, "cov": cov, "loss": sim_coeff * sim + std_coeff * std + cov_coeff * cov}
