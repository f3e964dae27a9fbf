"""Global Gaussian mixture of one feature layer: K-MLE with OAS shrinkage (spec §2), EM ablation (§5.1).

Features arrive as float32 rows (N, d). Parameters are estimated in float64; the whitening
factors used for assignment and scoring are float32 (`MixtureFactors`). The N x K cost matrix is
never materialised: costs are computed in row chunks sized by a memory budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from glad.errors import FeatureError

log = logging.getLogger(__name__)

LOG_2PI = math.log(2.0 * math.pi)
COST_BUDGET = 1 << 21  # whitened values (rows x K x d) behind one chunk of costs
WHITENED_COLUMNS = 1024  # CPU: whitened values per row in one GEMM block (see iter_costs)
KMLEPP_MAX_SEEDING_SAMPLES = 200_000
# K-MLE assigns against every component every FULL_PASS_EVERY iterations and to confirm
# convergence; in between, only against each vector's CANDIDATES cheapest components of the last
# full pass (labels rarely move further), which makes those iterations K / CANDIDATES times
# cheaper. The first assignment is the nearest seed in Sigma_0-whitened space (§2.2), which costs
# d instead of d^2 per (vector, component) pair.
FULL_PASS_EVERY = 10
CANDIDATES = 12
# Full passes rank every component with the expanded quadratic form (one K-wide GEMM per row,
# `ExpandedCosts`) and re-cost the RANKED cheapest exactly; the true cheapest is among them unless
# float32 cancellation misplaces it by more than RANKED - 1 places (never seen on real layers).
RANKED = 12
EXPANDED_BUDGET = 1 << 22  # expanded row values ([vech(t t^T), t, 1]) in one ranking chunk
# On the CPU, costs of layers up to this width come from the expanded form in float64 (exact to
# float32 rounding, unlike the float32 expanded form) in chunks of at least EXACT_EXPANDED_ROWS
# rows: against the whitened form on Lite0's layers, 0.43x the time at d = 24, 0.63x at d = 40,
# but 1.2x at d = 112 (2-core CPU, 60 000 vectors, K = 254 / 254 / 192).
EXACT_EXPANDED_MAX_DIM = 48
EXACT_EXPANDED_ROWS = 2048
# Terms more than this below a position's largest are raised to it before exp: exp(-80) is still a
# normal float32, whereas underflowing and denormal results take a slow path on x86 (about 20x
# slower here), and a raised term shifts the sum by under 1e-33 relative.
LSE_FLOOR = 80.0


# --- OAS (spec §2.3) ----------------------------------------------------------------------------


def oas_shrinkage(scatter: np.ndarray, n: np.ndarray | float, formula: str = "sklearn") -> np.ndarray:
    """OAS shrinkage intensity rho for MLE covariances `scatter` (..., d, d) of `n` samples each.

    "sklearn" drops the 2/d terms of Chen et al.'s Eq. (9) as scikit-learn does; "paper" keeps them.
    """
    d = scatter.shape[-1]
    tr = np.trace(scatter, axis1=-2, axis2=-1)
    tr2 = np.sum(scatter * scatter, axis=(-2, -1))  # tr(S^2) = ||S||_F^2 for symmetric S
    n = np.asarray(n, dtype=np.float64)
    if formula == "sklearn":
        num = tr2 + tr**2
        den = (n + 1.0) * (tr2 - tr**2 / d)
    elif formula == "paper":
        num = (1.0 - 2.0 / d) * tr2 + tr**2
        den = (n + 1.0 - 2.0 / d) * (tr2 - tr**2 / d)
    else:
        raise ValueError(f"unknown OAS formula {formula!r}; use 'sklearn' or 'paper'")
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(den > 0, np.minimum(num / den, 1.0), 1.0)
    return rho


def oas_covariance(scatter: np.ndarray, n: np.ndarray | float, formula: str = "sklearn") -> np.ndarray:
    """Shrunk covariance (1 - rho) S + rho tr(S)/d I, plus the 1e-9 relative diagonal floor (§2.6)."""
    d = scatter.shape[-1]
    rho = oas_shrinkage(scatter, n, formula)[..., None, None]
    mu = (np.trace(scatter, axis1=-2, axis2=-1) / d)[..., None, None]
    eye = np.eye(d)
    return (1.0 - rho) * scatter + (rho + 1e-9) * mu * eye


# --- Mixture parameters and their whitening factors ---------------------------------------------


@dataclass
class MixtureFactors:
    """What assignment and scoring need: D_k(u) = ||W_k u - b_k||^2, cost c_k = D_k + logdet_k."""

    whiteners: torch.Tensor  # float32 (K, d, d), W_k = L_k^-1
    offsets: torch.Tensor  # float32 (K, d), b_k = W_k mu_k
    logdets: torch.Tensor  # float64 (K,), log |Sigma_k|
    log_weights: torch.Tensor  # float64 (K,), log pi_k
    _expanded: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def expanded(self, dtype: torch.dtype = torch.float32) -> ExpandedCosts:
        """These factors' costs in the expanded form (`ExpandedCosts`), built once per dtype:
        its coefficients cost K d^3 (3-5 ms on Lite0's first layers), which scoring a
        global-weights model used to pay on every batch and layer."""
        if dtype not in self._expanded:
            self._expanded[dtype] = ExpandedCosts(self, dtype)
        return self._expanded[dtype]

    @property
    def n_components(self) -> int:
        return self.whiteners.shape[0]

    @property
    def dim(self) -> int:
        return self.whiteners.shape[1]

    def to(self, device: torch.device | str) -> MixtureFactors:
        return MixtureFactors(*(t.to(device) for t in
                                (self.whiteners, self.offsets, self.logdets, self.log_weights)))

    def select(self, components: np.ndarray) -> MixtureFactors:
        """The factors of the given components (indices or a boolean mask), in that order."""
        index = torch.from_numpy(np.asarray(components))
        return MixtureFactors(*(t[index] for t in
                                (self.whiteners, self.offsets, self.logdets, self.log_weights)))


@dataclass
class ComponentStats:
    """Weighted sufficient statistics of each component (spec §7.2): what an online update needs
    to move a mixture without the features that trained it.

    Decay and floors scale A, M2 by f and A2 by f^2 together, which leaves the MLE scatter
    S = M2 / A and Kish's effective sample size n_eff = A^2 / A2 (the n of OAS) unchanged.
    """

    weight: np.ndarray  # (K,) A_k: sum of sample weights, the effective count
    weight_sq: np.ndarray  # (K,) A2_k: sum of squared sample weights
    mean: np.ndarray  # (K, d)
    scatter: np.ndarray  # (K, d, d) M2_k: weighted centred scatter
    support: np.ndarray  # (K,) distinct images that contributed
    floor: np.ndarray  # (K,) A_k never decays below this (base components); 0: may fade away

    @classmethod
    def of_members(cls, x: torch.Tensor, labels: np.ndarray, image_ids: np.ndarray,
                   k: int) -> ComponentStats:
        """Unit-weight statistics of rows `x` (N, d) grouped by `labels` into `k` components."""
        counts = np.bincount(labels, minlength=k)
        order = np.argsort(labels, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        d = x.shape[1]
        mean, scatter = np.zeros((k, d)), np.zeros((k, d, d))
        grouped = x[torch.from_numpy(order)].double()
        for comp in np.flatnonzero(counts):
            members = grouped[bounds[comp] : bounds[comp + 1]]
            mu = members.mean(0)
            centred = members - mu
            mean[comp] = mu.numpy()
            scatter[comp] = (centred.t() @ centred).numpy()
        weight = counts.astype(np.float64)
        support = _distinct_images(labels, image_ids, k) if len(labels) else np.zeros(k, np.int64)
        return cls(weight, weight.copy(), mean, scatter, support, np.zeros(k))

    def refreshed(self, x: torch.Tensor, labels: np.ndarray, image_ids: np.ndarray,
                  moved: np.ndarray) -> ComponentStats:
        """These unit-weight statistics with the `moved` components (a boolean mask) recomputed
        from their members under `labels`, as `of_members` would; the others keep theirs, which
        is exact for components whose members did not change (a K-MLE iteration moves few)."""
        rows = np.flatnonzero(moved[labels])
        fresh = ComponentStats.of_members(x[torch.from_numpy(rows)], labels[rows], image_ids[rows],
                                          self.n_components)
        return ComponentStats(*(np.where(_expand(moved, getattr(self, f.name)), getattr(fresh, f.name),
                                         getattr(self, f.name)) for f in fields(self)))

    @property
    def n_components(self) -> int:
        return len(self.weight)

    @property
    def n_eff(self) -> np.ndarray:
        """Kish's effective sample size A^2 / A2 per component."""
        return self.weight**2 / np.maximum(self.weight_sq, 1e-300)

    def covariances(self, oas_formula: str = "sklearn") -> np.ndarray:
        """OAS-shrunk covariances of the MLE scatters M2 / A, shrunk with n = n_eff."""
        mle = self.scatter / self.weight[:, None, None]
        return oas_covariance(mle, self.n_eff, oas_formula)

    def scaled(self, factor: float | np.ndarray) -> ComponentStats:
        """Every sample weight multiplied by `factor` (per component when an array)."""
        f = np.broadcast_to(np.asarray(factor, np.float64), self.weight.shape)
        return replace(self, weight=self.weight * f, weight_sq=self.weight_sq * f * f,
                       scatter=self.scatter * f[:, None, None])

    def decayed(self, factor: float) -> ComponentStats:
        """Exponential forgetting by `factor`, floored (§7.5) so base components never vanish."""
        decayed = self.scaled(factor)
        lift = np.where(decayed.weight < self.floor, self.floor / np.maximum(decayed.weight, 1e-300),
                        1.0)
        return decayed.scaled(lift)

    def merged(self, batch: ComponentStats) -> ComponentStats:
        """These statistics plus a batch's over the same components (Chan et al.'s parallel
        update); components the batch does not touch are unchanged."""
        total = self.weight + batch.weight
        share = np.divide(batch.weight, total, out=np.zeros_like(total), where=total > 0)
        delta = batch.mean - self.mean
        cross = (self.weight * share)[:, None, None] * delta[:, :, None] * delta[:, None, :]
        return replace(self, weight=total, weight_sq=self.weight_sq + batch.weight_sq,
                       mean=self.mean + delta * share[:, None],
                       scatter=self.scatter + batch.scatter + cross,
                       support=self.support + batch.support)

    def without(self, batch: ComponentStats) -> ComponentStats:
        """These statistics minus a batch merged in earlier (the inverse of `merged`), as a
        re-assignment needs; components that would be left empty are kept as they are."""
        total = self.weight - batch.weight
        ok = total > 1e-9 * np.maximum(self.weight, 1e-300)
        rest = np.where(ok, total, 1.0)
        mean = (self.weight[:, None] * self.mean - batch.weight[:, None] * batch.mean) / rest[:, None]
        delta = batch.mean - mean
        cross = (rest * batch.weight / np.maximum(self.weight, 1e-300))[:, None, None] * (
            delta[:, :, None] * delta[:, None, :])
        removed = replace(self, weight=total, weight_sq=self.weight_sq - batch.weight_sq, mean=mean,
                          scatter=self.scatter - batch.scatter - cross,
                          support=np.maximum(self.support - batch.support, 1))
        return ComponentStats(*(np.where(_expand(ok, getattr(self, f.name)), getattr(removed, f.name),
                                         getattr(self, f.name)) for f in fields(self)))

    def select(self, components: np.ndarray) -> ComponentStats:
        """The statistics of the given components (indices or a boolean mask), in that order."""
        return ComponentStats(*(getattr(self, f.name)[components] for f in fields(self)))

    def concat(self, other: ComponentStats) -> ComponentStats:
        """These components followed by `other`'s."""
        return ComponentStats(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                                for f in fields(self)))

    def pooled_trace(self) -> float:
        """tr of the MLE covariance of all components' samples taken together (within plus
        between components): the layer's scale, against which one component's spread is judged."""
        total = self.weight.sum()
        centre = self.weight @ self.mean / total
        between = self.weight @ np.square(self.mean - centre).sum(1)
        return float((np.trace(self.scatter, axis1=1, axis2=2).sum() + between) / total)

    def degenerate(self, scale: float) -> np.ndarray:
        """Components whose MLE scatter has a trace of at most 1e-12 `scale` (§2.5 rule 3, as the
        batch M-step prunes them): (nearly) identical samples, such as a flat image region
        repeated, whose OAS covariance is (nearly) zero and has no usable Cholesky factor."""
        return ~(np.trace(self.scatter, axis1=1, axis2=2) > 1e-12 * scale * self.weight)


def _expand(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


@dataclass
class GaussianMixture:
    """Mixture parameters of one layer (float64), with per-component training support and, when
    the mixture can be updated online, the sufficient statistics behind them."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    covariances: np.ndarray  # (K, d, d), floored by `noise` when there is one
    counts: np.ndarray  # (K,) training vectors assigned
    image_support: np.ndarray  # (K,) distinct training images among them
    stats: ComponentStats | None = None
    # (d, d) acquisition noise no covariance is narrower than (`glad.acquisition`); None: no floor
    noise: np.ndarray | None = None

    @classmethod
    def from_stats(cls, stats: ComponentStats, oas_formula: str = "sklearn",
                   covariances: np.ndarray | None = None) -> GaussianMixture:
        """The K-MLE M-step's parameters from sufficient statistics: pi = A / sum A, mu = m,
        Sigma = OAS(M2 / A, n_eff) (or `covariances`, when the caller has them already)."""
        return cls(weights=stats.weight / stats.weight.sum(), means=stats.mean.copy(),
                   covariances=stats.covariances(oas_formula) if covariances is None else covariances,
                   counts=np.rint(stats.weight).astype(np.int64),
                   image_support=stats.support.astype(np.int64), stats=stats)

    @property
    def n_components(self) -> int:
        return len(self.weights)

    def with_noise(self, noise: np.ndarray) -> GaussianMixture:
        """This mixture with no component narrower than acquisition noise of covariance `noise`
        (d, d) in any direction (`noise_floored`)."""
        if self.noise is not None:
            raise ValueError("this mixture already has an acquisition noise floor")
        return replace(self, covariances=noise_floored(self.covariances, noise), noise=noise)

    def shrunk(self, stats: ComponentStats, oas_formula: str) -> np.ndarray:
        """The covariances of `stats`' components as this mixture's are made: OAS-shrunk, and
        floored by the acquisition noise when it has one (the online updater's new parameters)."""
        covariances = stats.covariances(oas_formula)
        return covariances if self.noise is None else noise_floored(covariances, self.noise)

    def factors(self, known: MixtureFactors | None = None,
                unchanged: np.ndarray | None = None) -> MixtureFactors:
        """Cholesky-based whitening factors; raises if a covariance is not positive definite.

        Components flagged `unchanged` (a boolean mask) take theirs from `known` (factors of the
        same components, by index) instead of a new factorisation; log-weights are always new.
        """
        if known is None or unchanged is None:
            return self._factors_of(slice(None))
        redo = np.flatnonzero(~unchanged)
        if not len(redo):
            return replace(known, log_weights=_log(self.weights))
        fresh = self._factors_of(redo)
        index = torch.from_numpy(redo)
        parts = []
        for old, new in ((known.whiteners, fresh.whiteners), (known.offsets, fresh.offsets),
                         (known.logdets, fresh.logdets)):
            merged = old.clone()
            merged[index] = new
            parts.append(merged)
        return MixtureFactors(*parts, log_weights=_log(self.weights))

    def _factors_of(self, components: slice | np.ndarray) -> MixtureFactors:
        chol, ok = cholesky_with_jitter(self.covariances[components])
        if not ok.all():
            raise FeatureError(f"{int((~ok).sum())} mixture covariances are not positive definite")
        return factors_from_cholesky(chol, self.means[components], self.weights[components])


def noise_floored(covariances: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Covariances (K, d, d) raised to at least `noise` (d, d) in every direction, unchanged
    where they are wider already: with noise = L Lᵀ, each Σ becomes L max(L⁻¹ Σ L⁻ᵀ, I) Lᵀ, its
    eigenvalues in noise-whitened space floored at one. Adding the noise instead (the exact
    likelihood of a noisy observation) also widened the Gaussians that were wide enough, and cost
    image AUROC where the floor cost none (casting_impeller 0.7 points, elpv_mono and kolektorsdd
    0.25, means of two fit seeds; bench/README.md)."""
    d = noise.shape[-1]
    chol = np.linalg.cholesky(noise + 1e-6 * np.trace(noise) / d * np.eye(d))  # dead channels
    inverse = np.linalg.inv(chol)
    values, vectors = np.linalg.eigh(inverse @ covariances @ inverse.T)
    floored = (vectors * np.maximum(values, 1.0)[..., None, :]) @ np.swapaxes(vectors, -1, -2)
    raised = chol @ floored @ chol.T
    return (raised + np.swapaxes(raised, -1, -2)) / 2


def cholesky_with_jitter(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factors; failures retried with growing diagonal jitter (§2.6). Returns (L, ok)."""
    cov_t = torch.from_numpy(cov)
    chol, info = torch.linalg.cholesky_ex(cov_t)
    ok = info == 0
    scale = torch.diagonal(cov_t, dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(cov.shape[-1], dtype=cov_t.dtype)
    for eps in (1e-10, 1e-8, 1e-6, 1e-4):
        if ok.all():
            break
        bad = torch.nonzero(~ok).flatten()
        retry, info = torch.linalg.cholesky_ex(cov_t[bad] + eps * scale[bad, None, None] * eye)
        fixed = info == 0
        chol[bad[fixed]] = retry[fixed]
        ok[bad[fixed]] = True
    return chol.numpy(), ok.numpy()


def _log(weights: np.ndarray) -> torch.Tensor:
    """float64 log pi_k of mixture weights, as the factors carry them."""
    return torch.log(torch.from_numpy(np.asarray(weights, dtype=np.float64)))


def factors_from_cholesky(chol: np.ndarray, means: np.ndarray, weights: np.ndarray) -> MixtureFactors:
    """Scoring factors (whiteners W = L^-1, offsets W mu, log-determinants, log-weights) of a
    mixture from its covariances' Cholesky factors L (see `cholesky_with_jitter`)."""
    chol_t = torch.from_numpy(chol)
    eye = torch.eye(chol.shape[-1], dtype=torch.float64).expand_as(chol_t)
    whiteners = torch.linalg.solve_triangular(chol_t, eye, upper=False)
    offsets = torch.einsum("kij,kj->ki", whiteners, torch.from_numpy(means))
    logdets = 2.0 * torch.log(torch.diagonal(chol_t, dim1=-2, dim2=-1)).sum(-1)
    return MixtureFactors(
        whiteners=whiteners.float().contiguous(),
        offsets=offsets.float().contiguous(),
        logdets=logdets,
        log_weights=_log(weights),
    )


# --- Costs --------------------------------------------------------------------------------------


def iter_costs(
    x: torch.Tensor, factors: MixtureFactors, budget: int = COST_BUDGET
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, costs) with costs[i, k] = D_k(x_i) + logdet_k, float32, in row chunks of
    budget / (K d) rows (or an integer multiple of that, see below).

    GEMMs against the whiteners stacked, with -b_k folded in through a constant column, so
    W_k u - b_k costs no extra pass over memory (the "subtract then multiply" form of §2.6,
    without the cancellation-prone expanded quadratic). On the CPU the components go in groups
    of about WHITENED_COLUMNS whitened values, so each block of W u - b stays in cache while its
    norms are taken (measured 2-3x faster than one wide GEMM, bench/README.md). Narrow layers on
    the CPU (d <= EXACT_EXPANDED_MAX_DIM) take the expanded form in float64 instead, in chunks
    of a whole multiple of the budget's rows (so a caller's alignment of rows is kept).
    """
    k, d = factors.n_components, factors.dim
    rows = max(1, budget // (k * d))
    if x.device.type == "cpu" and d <= EXACT_EXPANDED_MAX_DIM:
        expanded = factors.expanded(torch.float64)
        rows *= -(-EXACT_EXPANDED_ROWS // rows)
        for start in range(0, x.shape[0], rows):
            yield start, expanded(x[start : start + rows])
        return
    stacked = torch.cat([factors.whiteners.reshape(k * d, d),
                         -factors.offsets.reshape(k * d, 1)], dim=1).t()
    group = max(1, WHITENED_COLUMNS // d) if x.device.type == "cpu" else k
    blocks = [(first, stacked[:, first * d : (first + group) * d].contiguous())
              for first in range(0, k, group)]
    logdets = factors.logdets.to(device=x.device, dtype=torch.float32)
    ones = torch.ones(min(rows, x.shape[0]), 1, device=x.device)
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        augmented = torch.cat([chunk, ones[: len(chunk)]], dim=1)
        costs = torch.empty(len(chunk), k, device=x.device)
        for first, block in blocks:
            y = (augmented @ block).view(len(chunk), -1, d)
            costs[:, first : first + y.shape[1]] = torch.linalg.vector_norm(y, dim=-1).square_()
        yield start, costs.add_(logdets)


def assign(
    x: torch.Tensor, factors: MixtureFactors, n_candidates: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hard K-MLE assignment (Eq. 1 with the corrected sign, E1) against every component.

    Components are ranked with `ExpandedCosts`, and the cheapest RANKED ones (at least
    `n_candidates`) are re-costed exactly (`assign_among`), so labels and costs are those of
    the exact form while the ranking costs one K-wide GEMM per row.
    Returns labels, their total costs D + logdet - 2 log pi, and (if `n_candidates`) each row's
    cheapest components, which `assign_among` reuses to skip most distance computations.
    """
    width = min(max(n_candidates, RANKED), factors.n_components)
    ranked = rank_components(x, factors, width)
    labels, best = assign_among(x, factors, ranked)
    return labels, best, (ranked[:, :n_candidates] if n_candidates else None)


def _assign_exhaustive(x: torch.Tensor, factors: MixtureFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and total costs from the exact costs against every component (no ranking)."""
    penalty = (-2.0 * factors.log_weights).to(torch.float32)
    labels = torch.empty(x.shape[0], dtype=torch.int64)
    best = torch.empty(x.shape[0], dtype=torch.float32)
    for start, costs in iter_costs(x, factors):
        rows = slice(start, start + len(costs))
        best[rows], labels[rows] = torch.min(costs.add_(penalty), dim=1)
    return labels, best


class ExpandedCosts:
    """Costs D_k(u) + logdet_k of every component through the expanded quadratic form.

    With t = u - s (s the mean of the component means), Q_k = W_k^T W_k and e_k = W_k s - b_k:
    D_k(u) = t^T Q_k t + 2 e_k^T W_k t + |e_k|^2, the dot product of the expanded row
    [t_i t_j (i <= j), t, 1] with per-component coefficients. That is one GEMM with K outputs per
    row instead of K x d whitened values and their norms (several times faster on the CPU,
    bench/README.md), but it is the expanded form §2.6 warns about: in float32 (the default
    `dtype`) cancellation makes it fit for ranking components only, and callers recompute the
    costs of the components they keep exactly; in float64 it is exact to float32 rounding.
    """

    def __init__(self, factors: MixtureFactors, dtype: torch.dtype = torch.float32):
        w = factors.whiteners.double()
        b = factors.offsets.double()
        means = torch.linalg.solve(w, b[..., None])[..., 0]
        self.shift = means.mean(0)
        e = torch.einsum("kij,j->ki", w, self.shift) - b
        q = w.transpose(1, 2) @ w
        d = w.shape[1]
        upper = [q[:, i, i:] * torch.where(torch.arange(i, d) == i, 1.0, 2.0).double()
                 for i in range(d)]
        linear = 2.0 * torch.einsum("ki,kij->kj", e, w)
        constant = (e * e).sum(1) + factors.logdets.double()
        coefficients = torch.cat([*upper, linear, constant[:, None]], dim=1).t()
        self.coefficients = coefficients.to(device=w.device, dtype=dtype).contiguous()
        self.shift = self.shift.to(dtype)
        self.dim = d

    @property
    def width(self) -> int:
        """Values per expanded row: d (d + 1) / 2 + d + 1."""
        return self.coefficients.shape[0]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, K) float32 D_k + logdet_k of rows (n, d), computed in the coefficients' dtype."""
        # built transposed, so each product t_i t_j over the rows is one contiguous write (10-40 %
        # faster than strided columns on the CPU); the GEMM takes the transpose as it is
        t = (rows.to(self.shift.dtype) - self.shift.to(rows.device)).t().contiguous()
        expanded = torch.empty(self.width, t.shape[1], device=rows.device, dtype=t.dtype)
        column = 0
        for i in range(self.dim):
            torch.mul(t[i : i + 1], t[i:], out=expanded[column : column + self.dim - i])
            column += self.dim - i
        expanded[column : column + self.dim] = t
        expanded[-1] = 1.0
        return (expanded.t() @ self.coefficients.to(rows.device)).to(torch.float32)


def rank_components(x: torch.Tensor, factors: MixtureFactors, width: int) -> torch.Tensor:
    """(N, width) int64: each row's `width` cheapest components by approximate total cost
    c_k - 2 log pi_k (`ExpandedCosts`), in no particular order."""
    expanded = factors.expanded()
    penalty = (-2.0 * factors.log_weights).to(device=x.device, dtype=torch.float32)
    width = min(width, factors.n_components)
    out = torch.empty(x.shape[0], width, dtype=torch.int64, device=x.device)
    rows = max(1, EXPANDED_BUDGET // expanded.width)
    for start in range(0, x.shape[0], rows):
        costs = expanded(x[start : start + rows]).add_(penalty)
        out[start : start + len(costs)] = torch.topk(costs, width, dim=1, largest=False,
                                                     sorted=False)[1]
    return out


def padded_lengths(counts: torch.Tensor, steps_per_octave: int = 4) -> torch.Tensor:
    """Each count rounded up to the grid 2^(j / steps_per_octave) (integer): groups of equal
    padded length share one batched GEMM, with under 19% padding at 4 steps per doubling."""
    exponent = torch.ceil(torch.log2(counts.double()) * steps_per_octave - 1e-9)
    return torch.ceil(2.0 ** (exponent / steps_per_octave) - 1e-9).long()


class CandidateGroups:
    """The (row, candidate component) pairs of a candidate table, grouped for batched costs.

    Pairs are sorted by component, each component's pairs padded to `padded_lengths`, and
    the rows' features gathered once per bucket of equal length (in slices of about `budget`
    whitened values): evaluating every pair is then one batched GEMM per slice (W_k u - b_k, the
    form of §2.6), with no Python loop over Gaussians. K-MLE builds the groups at a full pass
    and reuses them in the candidate iterations until the next one, when only the whiteners
    change (`costs` takes the components' current ids). The groups also keep the last costs,
    so an iteration can re-cost only the components whose parameters moved.
    """

    def __init__(self, x: torch.Tensor, candidates: torch.Tensor, n_components: int,
                 budget: int = COST_BUDGET):
        width = candidates.shape[1]
        flat = candidates.flatten()
        self.slots = torch.nonzero(flat >= 0).flatten()  # table cells that hold a candidate
        self.components = flat[self.slots]  # the component of each slot
        self.slices: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._last_costs: torch.Tensor | None = None
        if not len(self.slots):
            return
        rows, components = self.slots // width, self.components
        d = x.shape[1]
        order = torch.argsort(components, stable=True)
        counts = torch.bincount(components, minlength=n_components)
        starts = torch.cumsum(counts, 0) - counts
        present = torch.nonzero(counts).flatten()
        lengths = padded_lengths(counts[present])
        for length in torch.unique(lengths).tolist():
            group = present[lengths == length]
            offsets = torch.arange(length, device=x.device)
            per_slice = max(1, budget // (length * d))
            for first in range(0, len(group), per_slice):
                comps = group[first : first + per_slice]
                used = offsets < counts[comps, None]
                slots = torch.where(used, starts[comps, None] + offsets, starts[comps, None])
                pairs = order[slots]  # (K_b, length); padding repeats the component's first pair
                self.slices.append((comps, pairs, used, x[rows[pairs]]))

    def costs(self, factors: MixtureFactors, current: torch.Tensor | None = None,
              unchanged: torch.Tensor | None = None) -> torch.Tensor:
        """D_k + logdet_k of every pair, float32, in the order of `slots`; `current` maps the
        ids the groups were built with to the factors' ids (-1: pruned since, cost +inf).

        `unchanged` (bool, by the factors' ids) flags components whose factors are those of the
        previous call: their pairs keep the previous costs instead of being computed again.
        """
        reuse = unchanged is not None and self._last_costs is not None
        if reuse:
            out = self._last_costs.clone()
            if current is not None:
                out[current[self.components] < 0] = math.inf
        else:
            out = torch.full((len(self.slots),), math.inf)
        for comps, pairs, used, features in self.slices:
            ids = comps if current is None else current[comps]
            todo = ids >= 0
            if reuse:
                todo &= ~unchanged[ids.clamp_min(0)]
            if not todo.any():
                continue
            if not todo.all():
                ids, pairs, used, features = ids[todo], pairs[todo], used[todo], features[todo]
            y = torch.bmm(features, factors.whiteners[ids].transpose(1, 2))
            y -= factors.offsets[ids, None, :]
            costs = torch.linalg.vector_norm(y, dim=-1).square_()
            costs += factors.logdets[ids, None].to(costs.dtype)
            out[pairs[used]] = costs[used]
        self._last_costs = out
        return out


def assign_among(
    x: torch.Tensor, factors: MixtureFactors, candidates: torch.Tensor,
    groups: CandidateGroups | None = None, current: torch.Tensor | None = None,
    unchanged: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignment restricted to each row's candidate components (-1 = none); Gaussian-grouped.

    `groups` (built from the same table) saves regrouping between full passes; `current` then
    maps the table's ids to the factors' and `unchanged` flags the components whose factors did
    not move since the groups' last use (see `CandidateGroups.costs`). Rows whose candidates
    were all pruned fall back to the full assignment.
    """
    n, width = candidates.shape
    if groups is None:
        groups = CandidateGroups(x, candidates, factors.n_components)
    ids = candidates.flatten()[groups.slots]
    if current is not None:
        ids = current[ids]
    penalty = torch.where(ids >= 0, -2.0 * factors.log_weights[ids.clamp_min(0)], math.inf)
    totals = torch.full((n * width,), math.inf)
    totals[groups.slots] = groups.costs(factors, current, unchanged) + penalty.to(torch.float32)
    best, slot = torch.min(totals.view(n, width), dim=1)
    labels = torch.gather(candidates, 1, slot[:, None])[:, 0]
    if current is not None:
        labels = current[labels]
    lost = torch.nonzero(~torch.isfinite(best)).flatten()
    if len(lost):
        labels[lost], best[lost] = _assign_exhaustive(x[lost], factors)
    return labels, best


def route(x: torch.Tensor, factors: MixtureFactors, n_candidates: int = 1):
    """Per row: the global K-MLE label, the global log-likelihood, and the `n_candidates`
    cheapest components with their costs D + logdet (for the local assignment)."""
    n, d = x.shape
    width = min(n_candidates, factors.n_components)
    labels = torch.empty(n, dtype=torch.int64)
    loglik = torch.empty(n, dtype=torch.float64)
    cand_index = torch.empty(n, width, dtype=torch.int64)
    cand_cost = torch.empty(n, width)
    penalty = (-2.0 * factors.log_weights).to(torch.float32)
    for start, costs in iter_costs(x, factors):
        rows = slice(start, start + len(costs))
        total = costs + penalty
        labels[rows] = total.argmin(1)
        loglik[rows] = torch.logsumexp(-0.5 * (total.double() + d * LOG_2PI), dim=1)
        idx = torch.topk(total, width, dim=1, largest=False, sorted=False)[1]
        cand_index[rows], cand_cost[rows] = idx, torch.gather(costs, 1, idx)
    return labels, loglik, cand_index, cand_cost


def logsumexp_(terms: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum exp over `dim` (§4.1), overwriting `terms`; exact up to the LSE_FLOOR clamp.

    The shift is the maximum where it is finite, so all -inf terms (no active Gaussian) still
    give -inf, as `torch.logsumexp` does.
    """
    peak = terms.amax(dim, keepdim=True)
    terms.sub_(torch.where(torch.isfinite(peak), peak, 0.0)).clamp_min_(-LSE_FLOOR).exp_()
    return terms.sum(dim).log_().add_(peak.squeeze(dim))


def global_loglik(x: torch.Tensor, factors: MixtureFactors) -> torch.Tensor:
    """log p(u) = LSE_k [log pi_k + log N(u; mu_k, Sigma_k)] of every row, float64."""
    return route(x, factors)[1]


# --- K-MLE (spec §2.4) --------------------------------------------------------------------------


@dataclass
class FitReport:
    """How a mixture fit went: iterations, K per iteration, final log-likelihood, why it stopped."""

    iterations: int
    n_components: list[int]
    log_likelihood: float
    stop_reason: str


IterationCallback = Callable[[int, int, float], None]


def fit_kmle(
    x: torch.Tensor,
    image_ids: np.ndarray,
    n_components: int,
    init: str = "kmle++",
    max_iter: int = 100,
    rel_tol: float = 1e-6,
    n_min: int = 2,
    min_images: int = 1,
    oas_formula: str = "sklearn",
    seed: int = 0,
    on_iteration: IterationCallback | None = None,
) -> tuple[GaussianMixture, FitReport]:
    """Fit a mixture to rows `x` (N, d) with single-loop K-MLE (hard EM) and OAS covariances.

    `image_ids[i]` is the training image of row i; components supported by fewer than
    `min_images` distinct images are pruned (§2.5, rule 4). `on_iteration(iteration, K,
    log-likelihood)` is called after every iteration (progress display).
    """
    x = _check_features(x)
    n, d = x.shape
    mixture, mean, base_cov = _initial_mixture(x, n_components, init, oas_formula, seed)
    global_trace = float(np.trace(base_cov))
    previous_ll, previous_labels, decreases = None, None, 0
    full_pass = False
    # candidates keep the ids of the pass that chose them; `current` maps those to today's ids
    # (pruning renumbers), so their grouped features are gathered once per full pass
    groups, current = None, None
    # Components whose members an iteration did not change keep their statistics, factors and
    # candidate costs: late iterations move a few hundred of 50 000 labels.
    factors, unchanged, kept = None, None, None
    history: list[int] = []
    stop_reason = "max_iter"
    for iteration in range(max_iter):
        k = mixture.n_components
        if iteration == 0:
            labels, best, candidates = _seed_assignment(x, mixture, mean, base_cov, CANDIDATES)
            groups, current = None, None
        else:
            factors = mixture.factors(None if factors is None else factors.select(kept), unchanged)
            if full_pass:  # every component ranked again, the cheapest re-costed exactly
                candidates = rank_components(x, factors, CANDIDATES)
                groups, current = None, None
            if groups is None:
                groups = CandidateGroups(x, candidates, k if current is None else len(current) - 1)
            labels, best = assign_among(x, factors, candidates, groups, current,
                                        None if unchanged is None else torch.from_numpy(unchanged))
        ll = -0.5 * float(best.double().sum() + n * d * LOG_2PI)
        history.append(k)
        stop = None
        if previous_labels is not None and torch.equal(labels, previous_labels):
            stop = "no label changed"
        elif previous_ll is not None:
            decreases = decreases + 1 if ll < previous_ll else 0
            if abs(ll - previous_ll) <= rel_tol * abs(previous_ll):
                stop = "converged"
            elif decreases >= 3:
                stop = "log-likelihood decreased 3 times"
                log.warning("K-MLE stopped: complete log-likelihood decreased 3 iterations in a row")
        if stop is not None and not full_pass:
            stop, full_pass = None, True  # confirm convergence against every component
        else:
            full_pass = (iteration + 1) % FULL_PASS_EVERY == 0
        touched = None if previous_labels is None else _moved(labels, previous_labels, k)
        mixture, kept = _m_step(x, labels, image_ids, mixture, touched, n_min, min_images,
                                oas_formula, global_trace)
        unchanged = None if touched is None else ~touched[kept]
        renumbered = _renumbering(kept, k)
        current = renumbered if current is None else renumbered[current]
        log.debug("K-MLE iteration %d: ll=%.8g K=%d", iteration, ll, mixture.n_components)
        if on_iteration is not None:
            on_iteration(iteration, mixture.n_components, ll)
        if stop is not None:
            stop_reason = stop
            break
        previous_ll, previous_labels = ll, renumbered[labels]
    report = FitReport(len(history), history, ll, stop_reason)
    return mixture, report


class Whitening:
    """v = L0^-1 (u - m) with Sigma_0 = L0 L0^T: the space in which k-MLE++ seeds and the first
    assignment are plain Euclidean (§2.2)."""

    def __init__(self, mean: np.ndarray, covariance: np.ndarray):
        self.shift = torch.from_numpy(mean)
        self.chol = torch.linalg.cholesky(torch.from_numpy(covariance))

    @property
    def logdet(self) -> float:
        """log |Sigma_0|."""
        return float(2.0 * torch.log(torch.diagonal(self.chol)).sum())

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Whitened rows (N, d), float32 (computed in float64)."""
        centred = (rows.double() - self.shift).t()
        return torch.linalg.solve_triangular(self.chol, centred, upper=False).t().float().contiguous()


def _seed_assignment(
    x: torch.Tensor, mixture: GaussianMixture, mean: np.ndarray, base_cov: np.ndarray, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first K-MLE assignment, while every component shares Sigma_0 and equal weights (§2.2):
    the nearest seed in Sigma_0-whitened space. Returns labels, their total costs (as `assign`
    computes them) and each row's `width` nearest seeds.

    Distances use the expanded form |v|^2 - 2 v.m + |m|^2, which is safe here (unlike §2.6's
    general case) because whitened, centred vectors have norms of the order of the distances.
    """
    whiten = Whitening(mean, base_cov)
    seeds = whiten(torch.from_numpy(mixture.means))
    seed_norms = (seeds * seeds).sum(1)
    k = len(seeds)
    width = min(width, k)
    constant = whiten.logdet + 2.0 * math.log(k)
    labels = torch.empty(x.shape[0], dtype=torch.int64)
    best = torch.empty(x.shape[0], dtype=torch.float32)
    candidates = torch.empty(x.shape[0], width, dtype=torch.int64)
    rows = max(1, COST_BUDGET // (k * x.shape[1]))
    for start in range(0, x.shape[0], rows):
        v = whiten(x[start : start + rows])
        dist = torch.addmm(seed_norms, v, seeds.t(), alpha=-2.0).add_((v * v).sum(1, keepdim=True))
        dist.clamp_(min=0.0)
        chunk = slice(start, start + len(v))
        values, idx = torch.topk(dist, width, dim=1, largest=False, sorted=True)
        labels[chunk], best[chunk], candidates[chunk] = idx[:, 0], values[:, 0] + constant, idx
    return labels, best, candidates


def _renumbering(kept: np.ndarray, k: int) -> torch.Tensor:
    """(k + 1,) map from ids before an M-step to the kept components' ids; pruned ones and the
    last entry (so that -1 maps to -1) become -1."""
    mapping = torch.full((k + 1,), -1, dtype=torch.int64)
    mapping[torch.from_numpy(kept)] = torch.arange(len(kept))
    return mapping


def _check_features(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32).contiguous()
    if x.ndim != 2 or x.shape[0] < 2:
        raise FeatureError(f"need at least 2 feature vectors (N, d), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise FeatureError("features contain NaN or Inf")
    return x


def _initial_mixture(
    x: torch.Tensor, n_components: int, init: str, oas_formula: str, seed: int
) -> tuple[GaussianMixture, np.ndarray, np.ndarray]:
    """Seeded means sharing Sigma_0 with equal weights (§2.2); also the global mean and Sigma_0."""
    mean, base_cov = _global_moments(x, oas_formula)
    rng = np.random.default_rng(seed)
    means = _initial_means(x, min(n_components, len(x)), init, base_cov, mean, rng)
    k = len(means)
    mixture = GaussianMixture(
        weights=np.full(k, 1.0 / k),
        means=means,
        covariances=np.repeat(base_cov[None], k, axis=0),
        counts=np.zeros(k, dtype=np.int64),
        image_support=np.zeros(k, dtype=np.int64),
    )
    return mixture, mean, base_cov


def _global_moments(x: torch.Tensor, oas_formula: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and OAS covariance of all rows: the shared start covariance Sigma_0 (§2.2)."""
    mean = x.double().mean(0)
    centred = x.double() - mean
    scatter = (centred.t() @ centred / x.shape[0]).numpy()
    if not np.trace(scatter) > 0:
        raise FeatureError("features are constant: every vector is the same, nothing to model")
    return mean.numpy(), oas_covariance(scatter, x.shape[0], oas_formula)


def _initial_means(
    x: torch.Tensor, k: int, init: str, base_cov: np.ndarray, mean: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Seeds: uniform random rows ("random") or k-means++ in Sigma_0-whitened space ("kmle++")."""
    n = x.shape[0]
    if init == "random":
        return x[rng.choice(n, size=k, replace=False)].double().numpy()
    if init != "kmle++":
        raise ValueError(f"unknown init {init!r}; use 'kmle++' or 'random'")
    pool = rng.choice(n, size=min(n, KMLEPP_MAX_SEEDING_SAMPLES), replace=False)
    white = Whitening(mean, base_cov)(x[pool])
    norms = (white * white).sum(1)

    def distances(choice: int) -> torch.Tensor:  # squared, expanded form (safe here, see below)
        return torch.addmv(norms + norms[choice], white, white[choice], alpha=-2.0).clamp_(min=0.0)

    chosen = [int(rng.integers(len(pool)))]
    dist = distances(chosen[0])
    for _ in range(1, k):
        cdf = np.cumsum(dist.double().numpy())
        if not cdf[-1] > 0.0:
            break  # every remaining row duplicates a seed
        # a draw with probability dist / sum(dist), as rng.choice(p=...) draws it
        choice = min(int(np.searchsorted(cdf / cdf[-1], rng.random(), side="right")), len(pool) - 1)
        chosen.append(choice)
        dist = torch.minimum(dist, distances(choice))
    return x[pool[chosen]].double().numpy()


def _moved(labels: torch.Tensor, previous: torch.Tensor, k: int) -> np.ndarray:
    """(k,) bool: the components that gained or lost a member between two assignments (the
    previous one's labels in today's ids, -1 for components pruned since)."""
    changed = labels != previous
    moved = np.zeros(k, dtype=bool)
    moved[labels[changed].numpy()] = True
    before = previous[changed]
    moved[before[before >= 0].numpy()] = True
    return moved


def _m_step(
    x: torch.Tensor, labels: torch.Tensor, image_ids: np.ndarray, previous: GaussianMixture,
    moved: np.ndarray | None, n_min: int, min_images: int, oas_formula: str, global_trace: float,
) -> tuple[GaussianMixture, np.ndarray]:
    """Cluster statistics, pruning (§2.5), means, MLE scatter, OAS; also the ids of kept components.

    Only the `moved` components (None: all) are recomputed; the others keep their statistics
    and covariances from `previous`, the mixture the labels were assigned under.
    """
    k = previous.n_components
    if moved is None or previous.stats is None:
        stats = ComponentStats.of_members(x, labels.numpy(), image_ids, k)
        moved = np.ones(k, dtype=bool)
    else:
        stats = previous.stats.refreshed(x, labels.numpy(), image_ids, moved)
    keep = (stats.weight >= n_min) & (stats.support >= min_images)
    keep &= np.trace(stats.scatter, axis1=1, axis2=2) > 1e-12 * global_trace * stats.weight
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        raise FeatureError("every mixture component was pruned: features are constant or too few")
    stats = stats.select(kept)
    covariances = previous.covariances[kept]
    redo = moved[kept]
    covariances[redo] = stats.select(redo).covariances(oas_formula)
    return GaussianMixture.from_stats(stats, oas_formula, covariances), kept


def _distinct_images(labels: np.ndarray, image_ids: np.ndarray, k: int) -> np.ndarray:
    pairs = np.unique(labels.astype(np.int64) * (int(image_ids.max()) + 1) + image_ids)
    return np.bincount(pairs // (int(image_ids.max()) + 1), minlength=k)


# --- EM ablation (spec §5.1) --------------------------------------------------------------------


def fit_em(
    x: torch.Tensor,
    image_ids: np.ndarray,
    n_components: int,
    init: str = "kmle++",
    max_iter: int = 100,
    rel_tol: float = 1e-6,
    n_min: int = 2,
    oas_formula: str = "sklearn",
    seed: int = 0,
) -> tuple[GaussianMixture, FitReport]:
    """Soft-assignment EM with OAS (n = N_k, decision E11); the paper's Table 1 ablation."""
    x = _check_features(x)
    n, d = x.shape
    mixture, mean, _ = _initial_mixture(x, n_components, init, oas_formula, seed)
    shift = torch.from_numpy(mean)
    previous_ll, history, stop_reason = None, [], "max_iter"
    for _ in range(max_iter):
        factors = mixture.factors()
        k = mixture.n_components
        mass = torch.zeros(k, dtype=torch.float64)
        sums = torch.zeros(k, d, dtype=torch.float64)
        squares = torch.zeros(k, d, d, dtype=torch.float64)
        hard = torch.empty(n, dtype=torch.int64)
        ll = 0.0
        for start, costs in iter_costs(x, factors):
            logits = factors.log_weights - 0.5 * (costs.double() + d * LOG_2PI)
            norm = torch.logsumexp(logits, dim=1, keepdim=True)
            ll += float(norm.sum())
            resp = torch.exp(logits - norm)
            rows = x[start : start + len(resp)].double() - shift
            mass += resp.sum(0)
            sums += resp.t() @ rows
            squares += torch.einsum("nk,nd,ne->kde", resp, rows, rows)
            hard[start : start + len(resp)] = resp.argmax(1)
        history.append(k)
        keep = (mass >= n_min) & (mass / n >= 1e-7)
        mass, sums, squares = mass[keep], sums[keep], squares[keep]
        mu = sums / mass[:, None]
        scatter = (squares / mass[:, None, None] - mu[:, :, None] * mu[:, None, :]).numpy()
        counts = np.bincount(hard.numpy(), minlength=k)[keep.numpy()]
        mixture = GaussianMixture(
            weights=(mass / mass.sum()).numpy(),
            means=(mu + shift).numpy(),
            covariances=oas_covariance(scatter, mass.numpy(), oas_formula),
            counts=counts,
            image_support=_distinct_images(hard.numpy(), image_ids, k)[keep.numpy()],
        )
        if previous_ll is not None and abs(ll - previous_ll) <= rel_tol * abs(previous_ll):
            stop_reason = "converged"
            break
        previous_ll = ll
    return mixture, FitReport(len(history), history, ll, stop_reason)
