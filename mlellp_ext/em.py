"""EM for learning from label proportions, in your own training loop.

MLE-LLP (Baručić & Kybic 2022) fits an instance classifier to bag counts by
expectation-maximisation over the hidden instance labels:

* **E-step** (:meth:`EMTargets.update`): from the logits of all N training
  instances, the soft targets ``phi_i = P(h_i = 1 | S_b = y_b)`` and the mean bag
  log-likelihood ``L = mean_b log P(S_b = y_b)``, exactly (:func:`posterior`);
* **M-step** (yours): ordinary supervised training against the targets, e.g.
  ``F.binary_cross_entropy_with_logits(model(x), em.targets(positions))`` over
  minibatches of instances in any order; a bag never has to fit in a batch.

Multi-class bags: give (B, C) count vectors; the targets are then (N, C) class
posteriors ``phi_ic = P(h_i = c | counts_b)`` (:func:`posterior_multiclass`) and the
M-step is a cross-entropy against them, ``F.cross_entropy(model(x), em.targets(positions))``.

Counts you cannot fully trust (an interval, a noisy or privatised count): give a
floating (N + B,) tensor of count log-weights (:mod:`mlellp_ext.count_weights`) in
place of the counts; the E-step is then :func:`posterior_weighted`, with targets
``phi_i = P(h_i = 1 | o_b)`` and ``L = mean_b log P(o_b)``.

Positions index the flat bag layout: bag b holds positions
``offsets[b]:offsets[b + 1]`` (see :mod:`mlellp_ext.bags`).
"""
from __future__ import annotations

import math

import torch

from .approx import posterior_multiclass_approx, posterior_multiclass_auto
from .bags import check_bag_values, check_count_vectors, count_slot_bags, count_slots
from .ops import DEFAULT_MAX_STATES, posterior, posterior_weighted
from .ops._checks import check_layout, check_multiclass_layout, check_weighted_layout

DEFAULT_TOL = 1e-4
ESTEPS = ("exact", "approx", "auto")
# The stopping rule applies only after this many E-steps: at the start a network that
# predicts about the bag proportions for everything leaves L nearly flat, and the
# rule alone would stop there (seen on digits with some seeds).
DEFAULT_MIN_ITERATIONS = 10


def _check_weight_values(offsets, count_log_weights):
    """Count log-weights EM can iterate on: finite or -inf (a NaN or +inf would make L
    NaN for good), and at least one possible count per bag."""
    w = count_log_weights.detach().cpu()
    bag_of_k = count_slot_bags(offsets.cpu(), w.shape[0])
    bad = torch.isnan(w) | (w == math.inf)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"EMTargets: count_log_weights[{i}] = {float(w[i])} (bag {int(bag_of_k[i])}); log-weights "
                         f"must be finite or -inf")
    possible = torch.zeros(offsets.shape[0] - 1, dtype=torch.long).index_add_(0, bag_of_k, (w > -math.inf).long())
    if bool((possible == 0).any()):
        b = int(torch.nonzero(possible == 0)[0])
        raise ValueError(f"EMTargets: bag {b} has no possible count (all its count_log_weights are -inf)")


def _initial_targets(offsets, counts, num_instances, weighted):
    """Each instance's target before any E-step: its bag's observed proportion, or
    (count log-weights) the expected count under the weights alone as a proportion."""
    sizes = offsets.diff()
    if weighted:
        k, bag_of_k = count_slots(offsets, counts.shape[0])
        w = counts.double()
        w = torch.where(torch.isfinite(w), w, torch.full_like(w, -math.inf))
        num_bags = sizes.shape[0]
        w = (w - torch.full((num_bags,), -math.inf, dtype=torch.float64, device=w.device)
             .scatter_reduce(0, bag_of_k, w, "amax")[bag_of_k]).exp().nan_to_num(0.0)
        mass = torch.zeros(num_bags, dtype=torch.float64, device=w.device).index_add_(0, bag_of_k, w)
        mean = torch.zeros_like(mass).index_add_(0, bag_of_k, w * k)
        ratio = (mean / mass.clamp(min=1e-300) / sizes.clamp(min=1)).clamp(0, 1).float()
    else:
        ratio = counts.float() / (sizes.unsqueeze(1) if counts.dim() == 2 else sizes).clamp(min=1).float()
    return torch.repeat_interleave(ratio, sizes, dim=0, output_size=num_instances)


class EMTargets:
    """The soft targets of N instances in bag layout, updated by exact E-steps.

    Args:
        offsets: (B + 1,) int64 bag offsets (``offsets[-1] = N``), any device.
        counts: (B,) int64 observed count of positives per bag, ``0 <= y_b <= n_b``;
            or (B, C) int64 count vectors (multi-class), each row summing to its
            bag's size; or a floating (N + B,) tensor of count log-weights
            ``log P(o_b | S_b = k)`` (:func:`posterior_weighted`'s layout, built by
            :mod:`mlellp_ext.count_weights`) for counts known only up to noise.
        tol: :attr:`converged` once ``|L - L_previous| < tol`` ...
        min_iterations: ... after at least this many :meth:`update` calls.
        max_states: multi-class only, the per-bag state budget of
            :func:`posterior_multiclass`; with ``estep="exact"`` a bag over it is
            an error here.
        estep: multi-class only: ``"exact"`` (default), ``"approx"``
            (:func:`posterior_multiclass_approx` for every bag) or ``"auto"``
            (exact within ``max_states``, approximate beyond;
            :attr:`approximated_bags` counts those).

    Attributes:
        phi: (N,) float32 targets ((N, C) for count vectors); before any update
            each bag's ``y_b / n_b``. Moves to the device of the logits given to
            :meth:`update`.
        log_likelihood: the last ``L`` (float), or None before any update.
        iterations: number of updates so far.
        converged: whether the stopping rule holds.
        approximated_bags: bags whose last E-step was approximate (multi-class
            ``estep="approx"``/``"auto"``; else 0); with ``group``, over all processes.

    Bad offsets or counts raise the op's ``ValueError`` messages (naming the argument) here;
    logits of the wrong shape or dtype raise a ``ValueError`` at :meth:`update`.

    Example (one EM iteration per epoch)::

        em = EMTargets(offsets, counts)
        for epoch in range(epochs):
            for x, positions in loader:  # M-step
                loss = F.binary_cross_entropy_with_logits(model(x), em.targets(positions))
                ...
            em.update(predict_logits(model))  # E-step on all N instances
            if em.converged:
                break
    """

    def __init__(self, offsets: torch.Tensor, counts: torch.Tensor, *, tol: float = DEFAULT_TOL,
                 min_iterations: int = DEFAULT_MIN_ITERATIONS, max_states: int = DEFAULT_MAX_STATES,
                 estep: str = "exact"):
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"EMTargets: tol must be a non-negative number, got {tol!r}")
        if not (isinstance(min_iterations, int) and min_iterations >= 0):
            raise ValueError(f"EMTargets: min_iterations must be a non-negative integer, got {min_iterations!r}")
        for name, t in (("offsets", offsets), ("counts", counts)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"EMTargets: {name} must be an int64 tensor, got {type(t).__name__}")
        # The op's checks of the layout and its values, with its messages (the logits come later).
        self.num_classes = counts.shape[1] if counts.dim() == 2 else None
        self.weighted = counts.is_floating_point()
        if estep not in ESTEPS:
            raise ValueError(f"EMTargets: estep must be one of {', '.join(ESTEPS)}, got {estep!r}")
        if self.weighted:
            if estep != "exact":
                raise ValueError(f"EMTargets: estep={estep!r} is for count vectors ((B, C) counts); count "
                                 f"log-weights always take the exact E-step")
            check_layout("EMTargets", torch.empty(0, device=offsets.device), offsets)
            n = int(offsets[-1])
            check_bag_values("EMTargets", n, offsets, None)
            check_weighted_layout("EMTargets", torch.empty(n, device=offsets.device), offsets, counts)
            _check_weight_values(offsets, counts)
        elif self.num_classes is not None:
            if not (isinstance(max_states, int) and max_states >= 1):
                raise ValueError(f"EMTargets: max_states must be a positive integer, got {max_states!r}")
            check_multiclass_layout("EMTargets", torch.empty(0, self.num_classes, device=offsets.device),
                                    offsets, counts, max_states)
            n = int(offsets[-1])
            check_count_vectors("EMTargets", n, offsets, counts, max_states if estep == "exact" else None)
        elif estep != "exact":
            raise ValueError(f"EMTargets: estep={estep!r} is for count vectors ((B, C) counts); "
                             f"binary counts always take the exact E-step")
        else:
            check_layout("EMTargets", torch.empty(0, device=offsets.device), offsets, counts)
            n = int(offsets[-1])
            check_bag_values("EMTargets", n, offsets, counts)
        self.offsets, self.counts, self.max_states, self.estep = offsets, counts, max_states, estep
        self.approximated_bags = 0
        self.num_instances, self.num_bags = n, offsets.shape[0] - 1
        self.tol, self.min_iterations = float(tol), min_iterations
        self.phi = _initial_targets(offsets, counts, n, self.weighted)
        self.log_likelihood: float | None = None
        self.iterations = 0
        self.converged = False
        self._layout = {offsets.device: (offsets, counts)}  # the layout per device (copied once)

    def __repr__(self):
        classes = "" if self.num_classes is None else f"num_classes={self.num_classes}, "
        return (f"EMTargets(num_instances={self.num_instances}, num_bags={self.num_bags}, {classes}"
                f"iterations={self.iterations}, log_likelihood={self.log_likelihood}, converged={self.converged})")

    def targets(self, positions) -> torch.Tensor:
        """The targets ``phi[positions]`` (float32, on phi's device) of these instance positions.

        ``positions``: integers in ``[0, N)`` (negative ones are not read from the end).
        Raises ``IndexError`` naming the first position out of range, ``ValueError``
        for non-integer positions."""
        positions = torch.as_tensor(positions)
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise ValueError(f"EMTargets.targets: positions must be integers, got dtype {positions.dtype}")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.num_instances):
            bad = positions[(positions < 0) | (positions >= self.num_instances)][0]
            raise IndexError(f"EMTargets.targets: position {int(bad)} is out of range for "
                             f"{self.num_instances} instances")
        return self.phi[positions.to(self.phi.device)]

    def _layout_on(self, device):
        if device not in self._layout:
            self._layout[device] = (self.offsets.to(device), self.counts.to(device))
        return self._layout[device]

    @torch.no_grad()
    def update(self, logits: torch.Tensor, *, group=None) -> float:
        """E-step: targets and mean bag log-likelihood L from the logits of all N instances.

        Args:
            logits: (N,) float logits of every instance, in the bag layout, any device
                (``phi`` moves there). Not differentiated.
            group: a ``torch.distributed`` process group when each process holds its
                own shard of the bags (torchrun): L is then the mean over all processes'
                bags, so every process takes the same decision to stop. The reduction
                runs on the CPU unless the group's backend is nccl. None: this process's
                bags only.

        Returns:
            L, also stored in :attr:`log_likelihood`.
        """
        expected = (self.num_instances,) if self.num_classes is None else (self.num_instances, self.num_classes)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
            got = f"shape {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            what = (f"1-D with one entry per instance (N = {self.num_instances})" if self.num_classes is None
                    else f"2-D with one row per instance and one column per class "
                         f"((N, C) = ({self.num_instances}, {self.num_classes}))")
            raise ValueError(f"EMTargets.update: logits must be {what}, got {got}")
        offsets, counts = self._layout_on(logits.device)
        if self.weighted:
            phi, log_lik = posterior_weighted(logits.detach(), offsets, counts)
        elif self.estep == "exact":
            phi, log_lik = posterior(logits.detach(), offsets, counts, max_states=self.max_states)
        elif self.estep == "approx":
            phi, log_lik = posterior_multiclass_approx(logits.detach(), offsets, counts)
            self.approximated_bags = self.num_bags
        else:
            phi, log_lik, approximated = posterior_multiclass_auto(logits.detach(), offsets, counts,
                                                                   max_states=self.max_states)
            self.approximated_bags = int(approximated.sum())
        total = log_lik.double().sum()
        num_bags = float(self.num_bags)
        if group is not None:
            import torch.distributed as dist

            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            both = torch.stack([total.to(device), torch.tensor(num_bags, dtype=torch.float64, device=device),
                                torch.tensor(float(self.approximated_bags), dtype=torch.float64, device=device)])
            dist.all_reduce(both, group=group)
            total, num_bags = both[0], float(both[1])
            self.approximated_bags = int(both[2])  # over all processes, as L
        L = float(total) / num_bags if num_bags else 0.0
        self.phi = phi.float()
        self.iterations += 1
        previous, self.log_likelihood = self.log_likelihood, L
        self.converged = (self.iterations >= self.min_iterations and previous is not None
                          and abs(L - previous) < self.tol)
        return L

    def state_dict(self) -> dict:
        """Tensors only (``torch.load(..., weights_only=True)`` reads them)."""
        L = math.nan if self.log_likelihood is None else self.log_likelihood
        return {"phi": self.phi, "log_likelihood": torch.tensor(L, dtype=torch.float64),
                "iterations": torch.tensor(self.iterations), "converged": torch.tensor(self.converged)}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("phi", "iterations", "converged") if k not in state]
        if missing or not ("log_likelihood" in state or "last_L" in state):  # last_L: the name before 0.2
            raise ValueError(f"EMTargets.load_state_dict: not an EMTargets state (missing "
                             f"{', '.join(missing) or 'log_likelihood'}; has {', '.join(state) or 'nothing'})")
        phi = state["phi"]
        if not isinstance(phi, torch.Tensor) or phi.shape != self.phi.shape:
            got = list(phi.shape) if isinstance(phi, torch.Tensor) else type(phi).__name__
            raise ValueError(f"EMTargets.load_state_dict: phi must have shape {list(self.phi.shape)} "
                             f"(the targets of every instance), got {got}")
        L = float(state["log_likelihood"] if "log_likelihood" in state else state["last_L"])
        self.phi = phi.to(self.phi.device, torch.float32)
        self.log_likelihood = None if math.isnan(L) else L
        self.iterations = int(state["iterations"])
        self.converged = bool(state["converged"])
