"""Independent reference implementations of the E-step, for tests and benchmarks.

* ``posterior_enumerate`` / ``log_pmf_enumerate``: enumerate every labeling
  consistent with the count (itertools.combinations, NumPy float64), as the
  method's original reference code does. Exponential: small bags only.
* ``posterior_padded_dp``: the forward recursion in log space on bags padded
  to the longest one, in plain PyTorch; phi comes from autograd through
  d log P(S=y) / dz_i = phi_i - sigmoid(z_i). This is what a user would write
  without this package, and the baseline the benchmarks measure against.
* ``covariance_enumerate`` / ``phi_jvp_padded_dp``: the Jacobian of phi,
  Cov(h | S = y), by enumeration, and its product with a tangent from
  autograd's second derivatives of the padded DP.

None of these share code with the compiled kernels.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch


def _log_sigmoid_pair(z: np.ndarray):
    lp = -np.logaddexp(0.0, -z)
    lq = -np.logaddexp(0.0, z)
    return lp, lq


def _logsumexp(a: np.ndarray) -> float:
    m = np.max(a)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(a - m))))


def posterior_enumerate(logits, offsets, counts):
    """(phi, log_likelihood) in float64 NumPy by enumerating all C(n, y) labelings per bag."""
    z_all = np.asarray(torch.as_tensor(logits).detach().cpu().double())
    off = np.asarray(torch.as_tensor(offsets).cpu())
    cnt = np.asarray(torch.as_tensor(counts).cpu())
    phi = np.zeros(len(z_all))
    log_lik = np.zeros(len(off) - 1)
    for b in range(len(off) - 1):
        z = z_all[off[b] : off[b + 1]]
        n, y = len(z), int(cnt[b])
        if n == 0:
            continue
        lp, lq = _log_sigmoid_pair(z)
        combos = list(itertools.combinations(range(n), y))
        member = np.zeros((len(combos), n), dtype=bool)
        for r, c in enumerate(combos):
            member[r, list(c)] = True
        lw = np.where(member, lp, lq).sum(axis=1)
        ll = _logsumexp(lw)
        log_lik[b] = ll
        if np.isfinite(ll):
            w = np.exp(lw - ll)
            phi[off[b] : off[b + 1]] = member.T.astype(np.float64) @ w
        else:
            phi[off[b] : off[b + 1]] = np.nan
    return phi, log_lik


def log_pmf_enumerate(logits, offsets):
    """Flat log P(S_b = k) (layout of mlellp::log_pmf) by enumerating all 2^n labelings."""
    z_all = np.asarray(torch.as_tensor(logits).detach().cpu().double())
    off = np.asarray(torch.as_tensor(offsets).cpu())
    out = []
    for b in range(len(off) - 1):
        z = z_all[off[b] : off[b + 1]]
        n = len(z)
        if n == 0:
            out.append(0.0)
            continue
        lp, lq = _log_sigmoid_pair(z)
        member = np.array(list(itertools.product([False, True], repeat=n)), dtype=bool)
        lw = np.where(member, lp, lq).sum(axis=1)
        k = member.sum(axis=1)
        out.extend(_logsumexp(lw[k == j]) for j in range(n + 1))
    return np.array(out)


def log_count_pmf_numpy(logits) -> np.ndarray:
    """log P(S = k), k = 0..n, for one bag: forward log-space DP over all counts, float64 NumPy. O(n^2)."""
    z = np.asarray(torch.as_tensor(logits).detach().cpu().double())
    lp, lq = _log_sigmoid_pair(z)
    row = np.full(len(z) + 1, -np.inf)
    row[0] = 0.0
    for i in range(len(z)):
        shifted = np.concatenate([[-np.inf], row[:-1]])
        row = np.logaddexp(row + lq[i], shifted + lp[i])
    return row


def posterior_leave_one_out(logits, count: int, instances):
    """phi_i for the given instances of one bag, from log P(S_{-i} = k) of the bag
    without instance i: phi_i = p_i P_{-i}(y-1) / (p_i P_{-i}(y-1) + q_i P_{-i}(y)).
    Also returns log P(S = y). float64 NumPy; O(n^2) per instance."""
    z = np.asarray(torch.as_tensor(logits).detach().cpu().double())
    log_lik = float(log_count_pmf_numpy(z)[count])
    phi = []
    for i in instances:
        rest = log_count_pmf_numpy(np.delete(z, i))
        lp, lq = _log_sigmoid_pair(z[i : i + 1])
        with_i = lp[0] + (rest[count - 1] if count >= 1 else -np.inf)
        without = lq[0] + (rest[count] if count <= len(z) - 1 else -np.inf)
        phi.append(float(np.exp(with_i - np.logaddexp(with_i, without))))
    return np.array(phi), log_lik


def _padded_log_lik(z: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, twice: bool = False) -> torch.Tensor:
    """log P(S_b = counts[b]) by the padded log-space forward DP, differentiable in z."""
    sizes = offsets[1:] - offsets[:-1]
    num_bags = sizes.numel()
    n_max = int(sizes.max()) if num_bags else 0
    bag = torch.repeat_interleave(torch.arange(num_bags, device=z.device), sizes)
    pos = torch.arange(z.numel(), device=z.device) - offsets[:-1][bag]
    lp = torch.nn.functional.logsigmoid(z)
    lq = torch.nn.functional.logsigmoid(-z)
    # Padding instances are certain negatives: log p = -inf, log q = 0.
    neg = torch.finfo(z.dtype).min / 4  # finite, so no NaN gradients
    LP = torch.full((num_bags, n_max), neg, dtype=z.dtype, device=z.device).index_put((bag, pos), lp)
    LQ = torch.zeros((num_bags, n_max), dtype=z.dtype, device=z.device).index_put((bag, pos), lq)
    alpha = torch.full((num_bags, n_max + 1), neg, dtype=z.dtype, device=z.device)
    alpha[:, 0] = 0
    for i in range(n_max):
        shifted = torch.cat([alpha.new_full((num_bags, 1), neg), alpha[:, :-1]], dim=1)
        a0, a1 = alpha + LQ[:, i : i + 1], shifted + LP[:, i : i + 1]
        # logaddexp's double backward is NaN where one side is far below the other;
        # logsumexp of a stack has none, but costs more, so only second derivatives use it.
        alpha = torch.logsumexp(torch.stack([a0, a1]), 0) if twice else torch.logaddexp(a0, a1)
    return alpha.gather(1, counts.view(-1, 1)).squeeze(1)


def posterior_padded_dp(logits: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor):
    """(phi, log_likelihood) by a padded log-space forward DP in plain PyTorch + autograd.

    Cost O(B * n_max^2) with n_max the largest bag; runs on logits' device and dtype.
    """
    z = logits.detach().clone().requires_grad_(True)
    log_lik = _padded_log_lik(z, offsets, counts)
    (grad,) = torch.autograd.grad(log_lik.sum(), z) if z.numel() else (torch.zeros_like(z),)
    phi = grad + torch.sigmoid(z.detach())
    return phi.detach(), log_lik.detach()


def phi_jvp_padded_dp(tangent: torch.Tensor, logits: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor):
    """Cov(h | S_b = counts[b]) @ tangent per bag, from autograd's second derivatives of
    the padded DP: the Hessian of log P_b is Cov - diag(sigmoid'(z))."""
    z = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_padded_log_lik(z, offsets, counts, twice=True).sum(), z, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * tangent).sum(), z)
    sigma = torch.sigmoid(z.detach())
    return hvp + sigma * (1 - sigma) * tangent


def covariance_enumerate(logits, offsets, counts):
    """Cov(h | S_b = counts[b]) of each bag as a list of float64 NumPy matrices, by
    enumerating all C(n, y) labelings."""
    z_all = np.asarray(torch.as_tensor(logits).detach().cpu().double())
    off = np.asarray(torch.as_tensor(offsets).cpu())
    cnt = np.asarray(torch.as_tensor(counts).cpu())
    out = []
    for b in range(len(off) - 1):
        z = z_all[off[b] : off[b + 1]]
        n, y = len(z), int(cnt[b])
        lp, lq = _log_sigmoid_pair(z)
        member = np.zeros((0, n))
        for c in itertools.combinations(range(n), y):
            row = np.zeros((1, n))
            row[0, list(c)] = 1
            member = np.vstack([member, row])
        lw = np.where(member > 0, lp, lq).sum(axis=1)
        w = np.exp(lw - _logsumexp(lw))
        mean = member.T @ w
        out.append((member.T * w) @ member - np.outer(mean, mean))
    return out
