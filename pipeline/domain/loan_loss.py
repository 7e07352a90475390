"""Monte Carlo loss distribution of a loan portfolio under a one-factor Gaussian copula.

Model (Vasicek / one-factor Gaussian copula)
-------------------------------------------
In simulation ``k`` a systematic factor ``Z_k ~ N(0, 1)`` is shared by every loan of the
book, and loan ``i`` defaults when its latent asset value falls below its default threshold::

    sqrt(rho) * Z_k + sqrt(1 - rho) * eps_ik < c_i,    c_i = Phi^-1(min(PD_i * m, 1))

with ``eps_ik ~ N(0, 1)`` independent of everything else and ``m`` the scenario PD
multiplier. The stressed PD ``PD_i * m`` is capped at 1 because a probability cannot exceed
one: a loan whose stressed PD reaches 1 defaults in every simulation (``c_i = +inf``), and a
loan with PD 0 never defaults (``c_i = -inf``). The portfolio loss of a simulation is the sum
of ``EAD_i * LGD_i`` over the loans that defaulted in it. **LGD is fixed** (deterministic, as
delivered in the loan book); recovery uncertainty is not modelled.

``rho`` must lie in ``[0, 1)``. ``rho == 1`` is rejected rather than treated as a limit: the
conditional default probability divides by ``sqrt(1 - rho)`` and the Vasicek formulas degenerate
there; the comonotone limit (loan ``i`` defaults iff ``Z < c_i``) is what ``rho = 0.999`` already
approximates to within simulation noise, and a delivered ``1.0`` is far more often a data error.

Sparse buckets: conditional Poisson thinning (exact)
---------------------------------------------------
The straightforward simulation draws one normal per loan and simulation. Here, conditionally on
``Z`` the defaults are independent Bernoulli draws with probabilities
``p_i(Z) = Phi((c_i - sqrt(rho) Z) / sqrt(1 - rho))``, and each Bernoulli(p) equals the event
"a Poisson(lambda) count is at least one" with ``lambda = -log(1 - p)``. Loans are sorted by
``c_i`` and cut into buckets of similar thresholds. For every (simulation, bucket):

1. ``N ~ Poisson(n_b * lambda_max)`` candidate points are drawn, ``lambda_max`` being the
   intensity of the bucket's riskiest loan given ``Z``;
2. each point lands on a loan of the bucket chosen uniformly (exact integer draw);
3. a point on loan ``j`` is kept with probability ``lambda_j / lambda_max`` (Poisson thinning).
   A squeeze avoids most special-function calls: a point whose uniform is below
   ``lambda_min / lambda_max`` is kept without evaluating ``lambda_j``.

The kept points on loan ``j`` form a Poisson(``lambda_j``) count (the superposition-and-thinning
theorem of Poisson processes), independent across loans, so "loan ``j`` got at least one point"
has probability exactly ``1 - exp(-lambda_j) = p_j(Z)``, independently across loans given
``Z``: the default indicators have exactly the copula's joint law; only double-precision
rounding separates this from the brute-force latent-normal simulation. Loans are then
de-duplicated and their ``EAD * LGD`` summed. The cost is proportional to the number of
*defaults* instead of the number of loans: thresholds within a bucket differ by at most 0.25
conditional standard deviations, so there are typically 1.3 to 2.5 points per default.

Dense buckets: byte uniforms against threshold tables (exact)
------------------------------------------------------------
Where defaults are common the cost per default loses to a cost per loan, so a (simulation,
bucket) pair whose riskiest loan has conditional intensity ``lambda_max > 0.1`` (about a 10%
conditional PD: the tail of ``Z``, or books with PDs of 10-40%) draws every loan directly:
``U < p_j(Z)`` with ``U = (u + V) / 256``. The leading byte ``u`` comes eight to a 64-bit
PCG64 output, and a table per bucket holds ``floor(256 p_j)`` on a grid of ``Z`` (built once
per plan from where each breakpoint ``Phi^-1(k / 256)`` is crossed, no normal CDF per cell),
so that the grid rows around the simulation's ``Z`` bracket it by ``[T_lo, T_hi]``:
``u < T_lo`` is a default and ``u > T_hi`` a survival whatever ``V`` is, and only the cells
with ``T_lo <= u <= T_hi`` (about 1% of them) draw ``V`` and evaluate ``p_j(Z)`` exactly.
Defaults are packed eight to a byte and summed through a lookup table of the loss of every
pattern of eight loans. Every decision is the exact event ``U < p_j(Z)``, so this branch
samples the same law as the sparse one; the switch depends on ``Z`` only. Points on loans
with ``PD = 0``, ``EAD * LGD = 0`` or a stressed ``PD = 1`` are never drawn: the first two
cannot change the loss and the last is added as a constant.

Per book the choice between the branches is what keeps the simulator faster than drawing
one normal per loan and simulation, and than the exact conditional-Bernoulli simulator
(:func:`simulate_portfolio_loss_bernoulli`), on low-, medium- and high-PD books alike
(``benchmarks/loan_loss.py``).

Tail figures, their errors and their allocation
---------------------------------------------------
:func:`summarise_losses` reports VaR and expected shortfall with Monte Carlo standard
errors: the ES weights the atom at the VaR by the part of it inside the tail (Acerbi and
Tasche), which matters for books whose losses sit on a few atoms (a high-grade book's VaR
is often the zero loss). :func:`contribution_chunk` is a second pass over the same
simulations that allocates the VaR and ES to loans and segments (Euler allocation), and
:func:`finite_portfolio_default_pmf` gives the exact law of a homogeneous book, against which
all of these are tested.

Reproducibility and chunking
----------------------------
Simulations are generated in fixed blocks of :data:`SIMULATION_BLOCK` simulations. Block ``k``
draws from its own stream ``PCG64(SeedSequence(seed, spawn_key=(0, k)))`` (the ``k``-th child of
the seed's "fast simulator" branch), and a block is always simulated whole, so the loss of
simulation ``j`` depends on ``(loans, pd_multiplier, rho, seed, j)`` only: bit-for-bit equal
whatever the chunk size, whatever the ``[start, stop)`` ranges a Spark job asks
:func:`simulate_chunk` for, and equal across ``n_sims`` on the common prefix. ``chunk_size`` is
rounded up to a whole number of blocks, which caps the working memory at one block whatever
``n_sims`` is (the returned array, 8 bytes per simulation, is the only part that grows).
"""

import io
import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from scipy import special, stats

from pipeline.domain.errors import DomainError

LOAN_ID = "loan_id"
PD = "pd"
EAD = "ead"
LGD = "lgd"
LOAN_COLUMNS = (LOAN_ID, PD, EAD, LGD)

SIMULATION_BLOCK = 1024
"""Simulations per random-number block: the unit of reproducibility and of working memory."""

SUMMARY_QUANTILES: dict[str, float] = {
    "p10": 0.10,
    "p50": 0.50,
    "p90": 0.90,
    "var_99": 0.99,
    "var_999": 0.999,
}
"""Quantiles reported by :func:`summarise_losses`, by summary key."""

QUANTILE_SE_CONFIDENCE = 0.95
"""Coverage of the order-statistic interval from which quantile standard errors are derived."""

VASICEK_MC_SE_MULTIPLE = 4.0
"""Monte Carlo standard errors allowed between simulated and closed-form Vasicek quantiles."""

_FAST_STREAM = 0
_LATENT_STREAM = 1
_BERNOULLI_STREAM = 2
_BUCKET_WIDTH = 0.25  # bucket width in conditional latent units, (c_max - c_min) / sqrt(1 - rho)
_MAX_BUCKETS = 64
_DENSE_LAMBDA = 0.1  # above this conditional intensity direct Bernoulli draws are cheaper
_DENSE_CELLS = 1 << 17  # cap on (simulation x loan) cells drawn at once by the dense branch
_BATCH_CELLS = 1 << 20  # loan-simulations whose points are resolved together
_TABLE_Z_MIN, _TABLE_Z_MAX = -7.0, 7.0  # factor range of the dense threshold tables
_TABLE_STEP = 1.0 / 64.0  # grid step of the tables in shifted-factor units
_TABLE_BYTES = 1 << 23  # cap on the tables of one plan; coarser grid beyond it
_BREAKPOINTS = special.ndtri(np.arange(1, 256) / 256.0)  # Phi^-1(k / 256), k = 1..255
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float64)
# cache-sized batches for the brute-force reference: 4x faster than 8 MB ones
_LATENT_CELLS = 1 << 16


class LoanBookError(DomainError):
    """A loan book or a simulation setting is outside what the loss model accepts."""


# --------------------------------------------------------------------------- loan book


@dataclass(frozen=True)
class LoanArrays:
    """A validated loan book as plain numpy arrays.

    This is what crosses process boundaries (a Spark broadcast, a Databricks task): it pickles
    cheaply, needs no polars on the worker, and validates itself on construction so that
    :func:`simulate_chunk` can trust it.

    Attributes
    ----------
    loan_id : numpy.ndarray
        Loan identifiers (any hashable values), used in error messages.
    pd : numpy.ndarray
        Probability of default per loan, in ``[0, 1]``.
    ead : numpy.ndarray
        Exposure at default per loan, ``>= 0``.
    lgd : numpy.ndarray
        Loss given default per loan (fixed fraction of EAD), in ``[0, 1]``.
    """

    loan_id: np.ndarray
    pd: np.ndarray
    ead: np.ndarray
    lgd: np.ndarray

    def __post_init__(self) -> None:
        """Validate the arrays and freeze them so the book cannot change under a simulation."""
        ids = np.asarray(self.loan_id)
        if ids.ndim != 1:
            raise LoanBookError(f"loan_id must be one-dimensional, got shape {ids.shape}")
        n = ids.shape[0]
        if n == 0:
            raise LoanBookError("the loan book is empty: at least one loan is needed")
        fields = {}
        for name in (PD, EAD, LGD):
            try:
                values = np.array(getattr(self, name), dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise LoanBookError(f"column {name!r} is not numeric: {exc}") from exc
            if values.shape != (n,):
                raise LoanBookError(
                    f"column {name!r} has shape {values.shape}, expected ({n},) like loan_id"
                )
            fields[name] = values
        _check_values(ids, fields[PD], fields[EAD], fields[LGD])
        for name, values in ((LOAN_ID, ids.copy()), *fields.items()):
            values.setflags(write=False)
            object.__setattr__(self, name, values)

    @property
    def n_loans(self) -> int:
        """Number of loans in the book."""
        return int(self.pd.shape[0])

    @property
    def loss_given_default(self) -> np.ndarray:
        """Loss of each loan if it defaults, ``EAD * LGD`` (LGD is fixed)."""
        return self.ead * self.lgd


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages read ``'L1': 1.2``."""
    return value.item() if isinstance(value, np.generic) else value


def _name_loans(ids: np.ndarray, values: np.ndarray, bad: np.ndarray, what: str) -> str:
    """Describe the first offending loans by id and value, with a count of the rest."""
    idx = np.flatnonzero(bad)
    shown = ", ".join(f"loan {_plain(ids[i])!r}: {_plain(values[i])!r}" for i in idx[:5])
    more = f" (and {idx.size - 5} more)" if idx.size > 5 else ""
    return f"{idx.size} loan(s) have {what}: {shown}{more}"


def _check_values(ids: np.ndarray, pd: np.ndarray, ead: np.ndarray, lgd: np.ndarray) -> None:
    """Raise :class:`LoanBookError` naming loans whose PD, EAD or LGD break the model's bounds."""
    for name, values in ((PD, pd), (EAD, ead), (LGD, lgd)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise LoanBookError(_name_loans(ids, values, bad, f"{name} missing, NaN or infinite"))
    bad = (pd < 0.0) | (pd > 1.0)
    if bad.any():
        raise LoanBookError(_name_loans(ids, pd, bad, "pd outside [0, 1]"))
    bad = ead < 0.0
    if bad.any():
        raise LoanBookError(_name_loans(ids, ead, bad, "negative ead (bound: ead >= 0)"))
    bad = (lgd < 0.0) | (lgd > 1.0)
    if bad.any():
        raise LoanBookError(_name_loans(ids, lgd, bad, "lgd outside [0, 1]"))
    unique, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        dupes = ", ".join(repr(_plain(u)) for u in unique[counts > 1][:5])
        raise LoanBookError(f"loan_id must be unique; duplicated: {dupes}")


def loan_arrays(loans: pl.DataFrame | LoanArrays) -> LoanArrays:
    """Validate a loan book and convert it to :class:`LoanArrays`.

    Parameters
    ----------
    loans : polars.DataFrame or LoanArrays
        One row per loan with columns ``loan_id``, ``pd``, ``ead`` and ``lgd``; other columns
        are ignored. A :class:`LoanArrays` is returned unchanged (it is validated already).

    Returns
    -------
    LoanArrays
        The validated book.

    Raises
    ------
    LoanBookError
        When the book is empty, a column is missing, a value is null, NaN or infinite, a PD or
        LGD lies outside ``[0, 1]``, an EAD is negative, or a loan id repeats; the message names
        the loans and values concerned.
    """
    if isinstance(loans, LoanArrays):
        return loans
    if not isinstance(loans, pl.DataFrame):
        raise LoanBookError(f"expected a polars DataFrame, got {type(loans).__name__}")
    missing = [c for c in LOAN_COLUMNS if c not in loans.columns]
    if missing:
        raise LoanBookError(
            f"loan book lacks column(s) {missing}; has {loans.columns}, needs {list(LOAN_COLUMNS)}"
        )
    if loans.height == 0:
        raise LoanBookError("the loan book is empty: at least one loan is needed")
    ids = loans.get_column(LOAN_ID).to_numpy()
    if loans.get_column(LOAN_ID).null_count():
        rows = np.flatnonzero(loans.get_column(LOAN_ID).is_null().to_numpy())[:5].tolist()
        raise LoanBookError(f"loan_id is null in row(s) {rows}")
    cols = {}
    for name in (PD, EAD, LGD):
        col = loans.get_column(name)
        if not col.dtype.is_numeric():
            raise LoanBookError(f"column {name!r} has type {col.dtype}, expected a number")
        cols[name] = col.cast(pl.Float64).to_numpy()  # nulls become NaN, reported below
    return LoanArrays(loan_id=ids, pd=cols[PD], ead=cols[EAD], lgd=cols[LGD])


def analytic_expected_loss(loans: pl.DataFrame | LoanArrays, pd_multiplier: float) -> float:
    """Exact expected portfolio loss, ``sum EAD * LGD * min(PD * m, 1)``.

    The copula changes the dependence between defaults, never their marginal probabilities,
    so the mean loss does not depend on ``rho``: this is the truth the simulated mean is
    checked against.

    Parameters
    ----------
    loans : polars.DataFrame or LoanArrays
        The loan book.
    pd_multiplier : float
        Scenario PD multiplier ``m >= 0``.

    Returns
    -------
    float
        The expected loss, in the currency of EAD.
    """
    book = loan_arrays(loans)
    _check_multiplier(pd_multiplier)
    stressed = np.minimum(book.pd * pd_multiplier, 1.0)
    return math.fsum((book.loss_given_default * stressed).tolist())


# --------------------------------------------------------------------------- settings


def _check_multiplier(pd_multiplier: float) -> None:
    if not isinstance(pd_multiplier, int | float | np.floating | np.integer) or not (
        math.isfinite(pd_multiplier) and pd_multiplier >= 0.0
    ):
        raise LoanBookError(
            f"pd_multiplier = {pd_multiplier!r} must be a finite number >= 0 "
            "(stressed PDs are PD * multiplier, capped at 1)"
        )


def _check_rho(rho: float) -> None:
    if not isinstance(rho, int | float | np.floating | np.integer) or not (0.0 <= rho < 1.0):
        raise LoanBookError(
            f"rho = {rho!r} must lie in [0, 1): rho = 1 makes sqrt(1 - rho) zero (comonotone "
            "limit, use e.g. 0.999 to approximate it) and rho < 0 is not a correlation"
        )


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise LoanBookError(f"{name} = {value!r} must be an integer >= {minimum}")


def _check_settings(pd_multiplier: float, rho: float, seed: int) -> None:
    _check_multiplier(pd_multiplier)
    _check_rho(rho)
    _check_count("seed", seed, 0)


# --------------------------------------------------------------------------- simulation


@dataclass
class _DenseTable:
    """Integer default thresholds of one bucket on a grid of the factor, for the dense branch.

    Row ``m`` holds, for each loan ``i`` of the bucket, ``T[m, i] = floor(256 p_i)`` evaluated
    at the shifted factor ``y_m = y_min + m h`` (``y = sqrt(rho) Z / sqrt(1 - rho)``,
    ``p_i = Phi(c_i / sqrt(1 - rho) - y)``), so for a simulation with ``y_m <= y < y_m+1`` the
    rows ``m + 1`` and ``m`` bracket ``floor(256 p_i(Z))`` from below and above.
    """

    y_min: float
    inv_h: float
    tab: np.ndarray  # (rows, loans) uint8
    lut: np.ndarray  # (groups of 8 loans) * 256 float64: loss of every default pattern of a byte
    offsets: np.ndarray  # 256 * group index, to index ``lut`` with packed default bytes


@dataclass(frozen=True)
class _Plan:
    """Loans that can default at random, sorted by threshold and cut into buckets."""

    c: np.ndarray  # sorted default thresholds Phi^-1(stressed PD), stressed PD in (0, 1)
    loss: np.ndarray  # EAD * LGD in the same order
    index: np.ndarray  # position of each of these loans in the book
    starts: np.ndarray  # first loan of each bucket
    sizes: np.ndarray  # loans per bucket
    c_lo: np.ndarray  # smallest threshold per bucket
    c_hi: np.ndarray  # largest threshold per bucket
    certain_loss: float  # loss of loans whose stressed PD is 1
    certain_index: np.ndarray  # their positions in the book
    certain_losses: np.ndarray  # their EAD * LGD
    a: float  # sqrt(rho)
    s: float  # sqrt(1 - rho)
    tables: dict[int, _DenseTable] = field(default_factory=dict)  # built on first use


def _make_plan(book: LoanArrays, pd_multiplier: float, rho: float) -> _Plan:
    stressed = np.minimum(book.pd * pd_multiplier, 1.0)
    lgd_loss = book.loss_given_default
    certain = (stressed >= 1.0) & (lgd_loss > 0.0)
    certain_loss = math.fsum(lgd_loss[certain].tolist())
    active = (stressed > 0.0) & (stressed < 1.0) & (lgd_loss > 0.0)
    positions = np.flatnonzero(active)
    c = special.ndtri(stressed[active])
    order = np.argsort(c, kind="stable")
    c, loss, positions = c[order], lgd_loss[active][order], positions[order]
    s = math.sqrt(1.0 - rho)
    if c.size:
        width = max(_BUCKET_WIDTH * s, (c[-1] - c[0]) / _MAX_BUCKETS)
        cell = np.floor((c - c[0]) / width).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    else:
        starts = np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, c.size]).astype(np.int64)
    return _Plan(
        c=c,
        loss=loss,
        index=positions,
        starts=starts,
        sizes=sizes,
        c_lo=c[starts],
        c_hi=c[starts + sizes - 1],
        certain_loss=certain_loss,
        certain_index=np.flatnonzero(certain),
        certain_losses=lgd_loss[certain],
        a=math.sqrt(rho),
        s=s,
    )


_PLANS: dict[tuple[int, float, float], tuple[LoanArrays, _Plan]] = {}
_PLAN_CACHE_SIZE = 8
_PLANS_LOCK = threading.Lock()


def _plan_for(book: LoanArrays, pd_multiplier: float, rho: float) -> _Plan:
    """The plan of a book and scenario, shared by the chunks of one run.

    A run calls :func:`simulate_chunk` once per chunk with the same book; the plan (and the
    dense tables it builds on first use) is kept for the few most recent (book, scenario)
    pairs. The book's arrays are read-only, so the book object identifies its content.
    """
    key = (id(book), pd_multiplier, rho)
    with _PLANS_LOCK:
        cached = _PLANS.get(key)
        if cached is not None and cached[0] is book:
            return cached[1]
        plan = _make_plan(book, pd_multiplier, rho)
        if len(_PLANS) >= _PLAN_CACHE_SIZE:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = (book, plan)
        return plan


def _dense_table(plan: _Plan, b: int) -> _DenseTable:
    """The threshold grid and loss lookup table of bucket ``b`` (built once per plan).

    The grid covers the factor values for which the bucket is dense, ``Z`` from
    :data:`_TABLE_Z_MIN` to where the riskiest loan's intensity falls to
    :data:`_DENSE_LAMBDA`; rows outside it are resolved exactly, cell by cell. ``T[m, i]``
    counts the breakpoints ``Phi^-1(k / 256)``, ``k = 1..255``, at or below
    ``c_i / s - y_m``, built from a histogram of the grid row at which each breakpoint is
    crossed instead of one normal CDF per cell.
    """
    table = plan.tables.get(b)
    if table is not None:
        return table
    start, size = int(plan.starts[b]), int(plan.sizes[b])
    d = plan.c[start : start + size] / plan.s
    slope = plan.a / plan.s
    x_dense = float(special.ndtri(-math.expm1(-_DENSE_LAMBDA)))
    z_top = _TABLE_Z_MAX if slope == 0.0 else (plan.c_hi[b] - plan.s * x_dense) / plan.a
    z_top = min(max(z_top, _TABLE_Z_MIN), _TABLE_Z_MAX)
    h = max(_TABLE_STEP, slope * (z_top - _TABLE_Z_MIN) * plan.c.size / _TABLE_BYTES)
    y_min = slope * _TABLE_Z_MIN - h
    rows = math.ceil((slope * z_top + 2.0 * h - y_min) / h) + 1
    # breakpoint k lies at or below d_i - y_m exactly for the rows m <= cross[i, k]
    cross = np.floor((d[:, None] - _BREAKPOINTS[None, :] - y_min) / h)
    cross = np.clip(cross, -1, rows - 1).astype(np.int64) + 1
    hist = np.bincount(
        (cross + (rows + 1) * np.arange(size)[:, None]).ravel(), minlength=size * (rows + 1)
    ).reshape(size, rows + 1)
    tab = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:].T  # T[m, i] = #{k: cross > m}
    groups = -(-size // 8)
    padded = np.zeros(groups * 8)
    padded[:size] = plan.loss[start : start + size]
    table = _DenseTable(
        y_min=y_min,
        inv_h=1.0 / h,
        tab=np.ascontiguousarray(tab, dtype=np.uint8),
        lut=(padded.reshape(groups, 8) @ _BYTE_BITS.T).ravel(),
        offsets=256 * np.arange(groups, dtype=np.intp),
    )
    plan.tables[b] = table
    return table


def _block_rng(seed: int, stream: int, block: int) -> np.random.Generator:
    """Random stream of one block: independent of chunking by construction."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream, block)))
    )


@dataclass
class _BlockDefaults:
    """Which loans defaulted in the simulations of one block, kept only when asked for.

    Sparse buckets leave keys ``sim * n + position`` (``position`` in the plan's order);
    dense buckets leave their default indicators packed eight loans to a byte.
    """

    n: int
    keys: list[np.ndarray] = field(default_factory=list)
    packed: list[tuple[int, int, np.ndarray, np.ndarray]] = field(default_factory=list)

    def pairs(self, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(simulation, plan position)`` of every default in the ``selected`` simulations."""
        sims, loans = [], []
        if self.keys:
            keys = np.concatenate(self.keys)
            keys = keys[selected[keys // self.n]]
            sims.append(keys // self.n)
            loans.append(keys % self.n)
        for start, size, rows, packed in self.packed:
            keep = selected[rows]
            if keep.any():
                bits = np.unpackbits(packed[keep], axis=1, count=size).astype(bool)
                r, i = np.nonzero(bits)
                sims.append(rows[keep][r])
                loans.append(start + i)
        if not sims:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(sims), np.concatenate(loans)


def _simulate_block(
    plan: _Plan, seed: int, block: int, log: _BlockDefaults | None = None
) -> np.ndarray:
    """Portfolio losses of the SIMULATION_BLOCK simulations of block ``block``.

    The factor, the bucket intensities and the Poisson counts are drawn for the whole block;
    the points are then drawn and resolved for batches of simulations holding at most
    ``_BATCH_CELLS`` loan-simulations, so that a large book does not hold a block's worth of
    points at once. Batches depend on the book's size only, never on the caller's chunking.
    With ``log`` the defaults are recorded as well (the random draws are the same).
    """
    rng = _block_rng(seed, _FAST_STREAM, block)
    n_sims = SIMULATION_BLOCK
    z = rng.standard_normal(n_sims)
    n = plan.c.size
    if n == 0:
        return np.full(n_sims, plan.certain_loss)
    shift = plan.a * z
    # conditional Poisson intensities of each bucket's safest and riskiest loan, (bucket, sim)
    lam_hi = -special.log_ndtr((shift[None, :] - plan.c_hi[:, None]) / plan.s)
    lam_lo = -special.log_ndtr((shift[None, :] - plan.c_lo[:, None]) / plan.s)
    dense = lam_hi > _DENSE_LAMBDA
    counts = rng.poisson(np.where(dense, 0.0, lam_hi * plan.sizes[:, None]))
    losses = np.zeros(n_sims)
    batch = max(1, min(n_sims, _BATCH_CELLS // n))
    for lo in range(0, n_sims, batch):
        hi = min(n_sims, lo + batch)
        keys = _defaulted_keys(plan, rng, shift, lam_lo, lam_hi, dense, counts, lo, hi)
        if keys.size:
            # several points may hit one loan: keep each (simulation, loan) once
            keys.sort()
            first = np.empty(keys.size, dtype=bool)
            first[:1] = True
            np.not_equal(keys[1:], keys[:-1], out=first[1:])
            keys = keys[first]
            sims = keys // n
            losses[lo:hi] += np.bincount(
                sims, weights=plan.loss[keys - sims * n], minlength=hi - lo
            )
            if log is not None:
                log.keys.append(keys + lo * n)
        for b in np.flatnonzero(dense[:, lo:hi].any(axis=1)):
            rows = lo + np.flatnonzero(dense[b, lo:hi])
            _dense_bucket(plan, int(b), rng, z, rows, losses, log)
    if plan.certain_loss:
        losses += plan.certain_loss
    return losses


def _defaulted_keys(
    plan: _Plan,
    rng: np.random.Generator,
    shift: np.ndarray,
    lam_lo: np.ndarray,
    lam_hi: np.ndarray,
    dense: np.ndarray,
    counts: np.ndarray,
    lo: int,
    hi: int,
) -> np.ndarray:
    """Keys ``(sim - lo) * n + loan`` of the sparse defaults of simulations ``[lo, hi)``.

    A key may repeat (two kept points on one loan); the caller de-duplicates.
    """
    n = plan.c.size
    sim_ids = np.arange(hi - lo, dtype=np.int64)
    parts: list[np.ndarray] = []
    for b in range(plan.starts.size):
        start, size = int(plan.starts[b]), int(plan.sizes[b])
        cnt = counts[b, lo:hi]
        total = int(cnt.sum())
        if not total:
            continue
        sim = np.repeat(sim_ids, cnt)
        loan = rng.integers(0, size, total)
        threshold = rng.random(total) * lam_hi[b, lo:hi][sim]
        keep = threshold < lam_lo[b, lo:hi][sim]  # squeeze: every loan of the bucket accepts
        unsure = np.flatnonzero(~keep)
        if unsure.size:
            x = (plan.c[start + loan[unsure]] - shift[lo + sim[unsure]]) / plan.s
            keep[unsure] = threshold[unsure] < -special.log_ndtr(-x)
        parts.append(sim[keep] * n + (start + loan[keep]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _dense_bucket(
    plan: _Plan,
    b: int,
    rng: np.random.Generator,
    z: np.ndarray,
    rows: np.ndarray,
    losses: np.ndarray,
    log: _BlockDefaults | None,
) -> None:
    """Add the losses of bucket ``b`` in simulations ``rows`` by direct Bernoulli draws.

    Each loan-simulation gets a uniform ``U = (u + V) / 256`` whose leading byte ``u`` is drawn
    first (eight to a 64-bit PCG64 output) and whose fraction ``V`` is drawn only when needed.
    The table rows around the simulation's factor bracket ``floor(256 p)`` by ``[T_lo, T_hi]``:
    ``u < T_lo`` implies ``U < p`` (default) and ``u > T_hi`` implies ``U >= p`` (survival), so
    only cells with ``T_lo <= u <= T_hi`` (about 1-2% of them) draw ``V`` and evaluate ``p``
    exactly. The defaults are packed to bits and summed through a lookup table of the loss of
    every pattern of eight loans.
    """
    table = _dense_table(plan, b)
    start, size = int(plan.starts[b]), int(plan.sizes[b])
    c_b = plan.c[start : start + size]
    m = np.floor((plan.a / plan.s * z[rows] - table.y_min) * table.inv_h)
    inside = (m >= 0) & (m <= table.tab.shape[0] - 2)
    m = np.where(inside, m, 0).astype(np.intp)
    step = max(1, _DENSE_CELLS // size)
    for r0 in range(0, rows.size, step):
        r = rows[r0 : r0 + step]
        cells = r.size * size
        u = (
            rng.bit_generator.random_raw(-(-cells // 8))
            .view(np.uint8)[:cells]
            .reshape(r.size, size)
        )
        t_hi = table.tab[m[r0 : r0 + step]]
        t_lo = table.tab[m[r0 : r0 + step] + 1]
        outside = ~inside[r0 : r0 + step]
        if outside.any():  # factor beyond the grid: every cell is resolved exactly
            t_lo[outside], t_hi[outside] = 0, 255
        hit = u < t_lo
        unsure = np.flatnonzero((u - t_lo) <= (t_hi - t_lo))
        if unsure.size:
            row, loan = np.divmod(unsure, size)
            p = special.ndtr((c_b[loan] - plan.a * z[r[row]]) / plan.s)
            hit.ravel()[unsure] = u.ravel()[unsure] + rng.random(unsure.size) < 256.0 * p
        packed = np.packbits(hit, axis=1)
        losses[r] += np.take(table.lut, table.offsets + packed).sum(axis=1)
        if log is not None:
            log.packed.append((start, size, r, packed))


def _simulate_range(block_fn: Any, start: int, stop: int) -> np.ndarray:
    """Simulations ``[start, stop)`` assembled from whole blocks produced by ``block_fn``."""
    out = np.empty(stop - start)
    if stop == start:
        return out
    for block in range(start // SIMULATION_BLOCK, (stop - 1) // SIMULATION_BLOCK + 1):
        first = block * SIMULATION_BLOCK
        lo, hi = max(start, first), min(stop, first + SIMULATION_BLOCK)
        out[lo - start : hi - start] = block_fn(block)[lo - first : hi - first]
    return out


def simulate_chunk(
    loans_arrays: LoanArrays,
    *,
    pd_multiplier: float,
    rho: float,
    seed: int,
    start: int,
    stop: int,
) -> np.ndarray:
    """Portfolio losses of simulations ``[start, stop)``: the unit a Spark task runs.

    The result for a given simulation index does not depend on ``start`` and ``stop``, so a
    job may split ``range(n_sims)`` any way it likes (e.g. :func:`chunk_ranges`, one chunk id
    per row through ``mapInPandas``), run the pieces anywhere, and concatenate them in order to
    get exactly :func:`simulate_portfolio_loss`. Ranges aligned to :data:`SIMULATION_BLOCK` are
    the efficient ones: a block cut by a range boundary is simulated whole by both neighbours.

    Parameters
    ----------
    loans_arrays : LoanArrays
        The validated loan book (see :func:`loan_arrays`).
    pd_multiplier : float
        Scenario PD multiplier ``>= 0``; stressed PDs are capped at 1.
    rho : float
        Asset correlation in ``[0, 1)``.
    seed : int
        Non-negative seed of the whole run.
    start, stop : int
        Simulation indices, ``0 <= start <= stop``.

    Returns
    -------
    numpy.ndarray
        ``stop - start`` portfolio losses (float64).

    Raises
    ------
    LoanBookError
        When a setting is out of range.
    """
    if not isinstance(loans_arrays, LoanArrays):
        raise LoanBookError(
            "simulate_chunk needs LoanArrays (see loan_arrays()), "
            f"got {type(loans_arrays).__name__}"
        )
    _check_settings(pd_multiplier, rho, seed)
    _check_count("start", start, 0)
    _check_count("stop", stop, int(start))
    plan = _plan_for(loans_arrays, float(pd_multiplier), float(rho))
    return _simulate_range(lambda block: _simulate_block(plan, int(seed), block), start, stop)


def chunk_ranges(n_sims: int, chunk_size: int, start: int = 0) -> list[tuple[int, int]]:
    """Split ``range(start, n_sims)`` into block-aligned ``[start, stop)`` chunks.

    ``chunk_size`` is rounded up to a multiple of :data:`SIMULATION_BLOCK` and chunk boundaries
    fall on multiples of it, so that no block is simulated twice; the first and last chunks
    may be shorter. ``start > 0`` is the next round of an automatic run (see
    :func:`next_n_sims`); with ``start = 0`` the chunks are those of every earlier release.

    Parameters
    ----------
    n_sims : int
        Number of simulations, ``>= 1``.
    chunk_size : int
        Wanted simulations per chunk, ``>= 1``.
    start : int, default 0
        First simulation, ``0 <= start < n_sims``.

    Returns
    -------
    list of tuple of int
        Consecutive ranges covering ``start .. n_sims``.
    """
    _check_count("n_sims", n_sims, 1)
    _check_count("chunk_size", chunk_size, 1)
    _check_count("start", start, 0)
    if start >= n_sims:
        raise LoanBookError(f"start = {start} must be below n_sims = {n_sims}")
    step = -(-int(chunk_size) // SIMULATION_BLOCK) * SIMULATION_BLOCK
    bounds = [int(start), *range((int(start) // step + 1) * step, int(n_sims), step), int(n_sims)]
    return list(itertools.pairwise(bounds))


def simulate_portfolio_loss(
    loans: pl.DataFrame | LoanArrays,
    *,
    pd_multiplier: float,
    rho: float,
    n_sims: int,
    seed: int,
    chunk_size: int = 10_000,
) -> np.ndarray:
    """Simulate the portfolio loss distribution by conditional Poisson thinning.

    See the module docstring for the model and why the algorithm is exact in distribution.
    Working memory is one block of :data:`SIMULATION_BLOCK` simulations plus one chunk of
    results, whatever ``n_sims``; the output is bit-for-bit identical for any ``chunk_size``.

    Parameters
    ----------
    loans : polars.DataFrame or LoanArrays
        Loan book with ``loan_id``, ``pd``, ``ead`` and ``lgd``.
    pd_multiplier : float
        Scenario PD multiplier ``>= 0``; stressed PDs are capped at 1.
    rho : float
        Asset correlation in ``[0, 1)``.
    n_sims : int
        Number of simulations, ``>= 1``.
    seed : int
        Non-negative seed.
    chunk_size : int, default 10_000
        Simulations per chunk (rounded up to whole blocks); a memory knob only.

    Returns
    -------
    numpy.ndarray
        ``n_sims`` portfolio losses (float64), in the currency of EAD.

    Raises
    ------
    LoanBookError
        For an invalid loan book or setting; the message names the loan or value and the bound.
    """
    book = loan_arrays(loans)
    _check_settings(pd_multiplier, rho, seed)
    out = np.empty(_positive(n_sims))
    for lo, hi in chunk_ranges(n_sims, chunk_size):
        out[lo:hi] = simulate_chunk(
            book, pd_multiplier=pd_multiplier, rho=rho, seed=seed, start=lo, stop=hi
        )
    return out


def _positive(n_sims: int) -> int:
    _check_count("n_sims", n_sims, 1)
    return int(n_sims)


def simulate_portfolio_loss_latent(
    loans: pl.DataFrame | LoanArrays,
    *,
    pd_multiplier: float,
    rho: float,
    n_sims: int,
    seed: int,
    chunk_size: int = 10_000,
) -> np.ndarray:
    """Brute-force reference: one latent normal per loan and simulation, straight from the model.

    This is the definition of the model written as vectorised numpy; tests use it as the
    distributional oracle for :func:`simulate_portfolio_loss` and the benchmark as the
    straightforward baseline. It uses the same block scheme (so it is chunk-invariant too) on a
    different branch of the seed (``spawn_key=(1, block)``), so the two simulators never share
    random numbers even under the same seed.

    Parameters
    ----------
    loans : polars.DataFrame or LoanArrays
        Loan book with ``loan_id``, ``pd``, ``ead`` and ``lgd``.
    pd_multiplier : float
        Scenario PD multiplier ``>= 0``; stressed PDs are capped at 1.
    rho : float
        Asset correlation in ``[0, 1)``.
    n_sims : int
        Number of simulations, ``>= 1``.
    seed : int
        Non-negative seed.
    chunk_size : int, default 10_000
        Simulations per chunk (rounded up to whole blocks).

    Returns
    -------
    numpy.ndarray
        ``n_sims`` portfolio losses (float64).
    """
    book = loan_arrays(loans)
    _check_settings(pd_multiplier, rho, seed)
    n_sims = _positive(n_sims)
    c = special.ndtri(np.minimum(book.pd * pd_multiplier, 1.0))  # -inf for PD 0, +inf for PD 1
    lgd_loss = book.loss_given_default
    a, s = math.sqrt(rho), math.sqrt(1.0 - rho)
    rows = max(1, _LATENT_CELLS // c.size)

    def block_fn(block: int) -> np.ndarray:
        rng = _block_rng(int(seed), _LATENT_STREAM, block)
        z = rng.standard_normal(SIMULATION_BLOCK)
        losses = np.empty(SIMULATION_BLOCK)
        for r0 in range(0, SIMULATION_BLOCK, rows):
            r1 = min(r0 + rows, SIMULATION_BLOCK)
            latent = rng.standard_normal((r1 - r0, c.size))
            latent *= s
            latent += (a * z[r0:r1])[:, None]
            losses[r0:r1] = (latent < c).astype(np.float64) @ lgd_loss
        return losses

    out = np.empty(n_sims)
    for lo, hi in chunk_ranges(n_sims, chunk_size):
        out[lo:hi] = _simulate_range(block_fn, lo, hi)
    return out


def simulate_portfolio_loss_bernoulli(
    loans: pl.DataFrame | LoanArrays,
    *,
    pd_multiplier: float,
    rho: float,
    n_sims: int,
    seed: int,
    chunk_size: int = 10_000,
) -> np.ndarray:
    """Exact conditional-Bernoulli reference: the factor, then one uniform per loan and simulation.

    Given ``Z`` the defaults are independent with probabilities ``p_i(Z)``, so drawing
    ``U_ik ~ U(0, 1)`` and declaring a default when ``U_ik < p_i(Z_k)`` samples the model
    exactly; this is the textbook simulator the benchmark measures :func:`simulate_portfolio_loss`
    against, and a second distributional oracle for the tests. Same block scheme as the other
    simulators, on its own branch of the seed (``spawn_key=(2, block)``).

    Parameters
    ----------
    loans : polars.DataFrame or LoanArrays
        Loan book with ``loan_id``, ``pd``, ``ead`` and ``lgd``.
    pd_multiplier : float
        Scenario PD multiplier ``>= 0``; stressed PDs are capped at 1.
    rho : float
        Asset correlation in ``[0, 1)``.
    n_sims : int
        Number of simulations, ``>= 1``.
    seed : int
        Non-negative seed.
    chunk_size : int, default 10_000
        Simulations per chunk (rounded up to whole blocks).

    Returns
    -------
    numpy.ndarray
        ``n_sims`` portfolio losses (float64).
    """
    book = loan_arrays(loans)
    _check_settings(pd_multiplier, rho, seed)
    n_sims = _positive(n_sims)
    c = special.ndtri(np.minimum(book.pd * pd_multiplier, 1.0))  # -inf for PD 0, +inf for PD 1
    lgd_loss = book.loss_given_default
    a, s = math.sqrt(rho), math.sqrt(1.0 - rho)
    rows = max(1, _LATENT_CELLS // c.size)

    def block_fn(block: int) -> np.ndarray:
        rng = _block_rng(int(seed), _BERNOULLI_STREAM, block)
        z = rng.standard_normal(SIMULATION_BLOCK)
        losses = np.empty(SIMULATION_BLOCK)
        for r0 in range(0, SIMULATION_BLOCK, rows):
            r1 = min(r0 + rows, SIMULATION_BLOCK)
            p = c[None, :] - (a * z[r0:r1])[:, None]
            p /= s
            special.ndtr(p, out=p)
            losses[r0:r1] = (rng.random((r1 - r0, c.size)) < p).astype(np.float64) @ lgd_loss
        return losses

    out = np.empty(n_sims)
    for lo, hi in chunk_ranges(n_sims, chunk_size):
        out[lo:hi] = _simulate_range(block_fn, lo, hi)
    return out


# --------------------------------------------------------------------------- summaries

ES_LEVELS: dict[str, float] = {"es_99": 0.99, "es_999": 0.999}
"""Expected-shortfall levels reported by :func:`summarise_losses`, by summary key."""

SUMMARY_FIGURES = ("expected_loss", *SUMMARY_QUANTILES, *ES_LEVELS)
"""Every published figure; each has a Monte Carlo standard error ``se_<figure>``."""

DEFAULT_MAX_RELATIVE_SE: dict[str, float] = {
    "expected_loss": 0.005,
    "p10": 0.02,
    "p50": 0.01,
    "p90": 0.01,
    "var_99": 0.015,
    "var_999": 0.03,
    "es_99": 0.015,
    "es_999": 0.03,
}
"""Default bound on ``se / |value|`` per figure, the gate :func:`mc_error_failure` applies."""


def _order_statistic(sorted_losses: np.ndarray, rank: int) -> float:
    """The ``rank``-th smallest loss (1-based), rank clipped to ``[1, n]``."""
    n = sorted_losses.size
    return float(sorted_losses[min(max(rank, 1), n) - 1])


def _quantile_rank(n: int, q: float) -> int:
    """1-based rank of the empirical ``q``-quantile, ``ceil(n q)`` (inverse empirical CDF)."""
    return max(1, math.ceil(round(n * q, 9)))


def _quantile_se(sorted_losses: np.ndarray, q: float) -> float:
    """Distribution-free standard error of the empirical ``q``-quantile.

    The number of simulations at or below the true quantile is Binomial(n, q), so the order
    statistics with ranks ``l = F^-1(alpha/2)`` and ``u = F^-1(1 - alpha/2) + 1`` of that
    binomial bracket the true quantile with probability about ``1 - alpha`` whatever the loss
    distribution. The standard error is that interval's width over ``2 z_{1 - alpha/2}``, the
    width a normal estimator with this SE would have. This is the asymptotic quantile SE
    ``sqrt(q (1 - q) / n) / f(VaR)`` with the density ``f`` estimated by the spacing of the
    order statistics around the quantile (a Siddiqui-Bloch-Gastwirth estimate), which needs
    no bandwidth and stays valid at atoms: when both bracketing order statistics fall on the
    same atom the estimate is exact with about 95% probability and its SE is 0.
    """
    n = sorted_losses.size
    alpha = 1.0 - QUANTILE_SE_CONFIDENCE
    lo = int(stats.binom.ppf(alpha / 2.0, n, q))
    hi = int(stats.binom.ppf(1.0 - alpha / 2.0, n, q)) + 1
    width = _order_statistic(sorted_losses, hi) - _order_statistic(sorted_losses, lo)
    return width / (2.0 * float(special.ndtri(1.0 - alpha / 2.0)))


def _expected_shortfall(sorted_losses: np.ndarray, q: float) -> tuple[float, float]:
    """Expected shortfall at level ``q`` with the atom at the VaR weighted, and its SE.

    ``ES_q = VaR_q + sum((x - VaR_q)^+) / (n (1 - q))``, which equals Acerbi and Tasche's
    ``(E[L 1{L > VaR}] + VaR (P(L <= VaR) - q)) / (1 - q)`` on the empirical law: the
    simulations above the VaR count fully and the atom at the VaR counts for the share
    ``(F_n(VaR) - q) / P_n(L = VaR)`` that lies in the tail. The standard error comes from the
    influence function of that estimator, ``psi(x) = VaR + (x - VaR)^+ / (1 - q) - ES`` (the
    term from estimating the VaR vanishes because ``VaR`` minimises ``v + E(L - v)^+ / (1 - q)``,
    Rockafellar and Uryasev), so ``SE = sd((L - VaR)^+) / ((1 - q) sqrt(n))``. Batch means
    over chunks would need every chunk to hold enough tail simulations (1,000 at 99.9%) and
    would depend on the chunking; this SE does neither and is tested against the spread over
    independent seeds.
    """
    n = sorted_losses.size
    var = _order_statistic(sorted_losses, _quantile_rank(n, q))
    above = sorted_losses[np.searchsorted(sorted_losses, var, side="right") :]
    excess = above - var
    total = float(np.sum(excess))
    es = var + total / (n * (1.0 - q))
    es = min(max(es, var), float(sorted_losses[-1]))  # rounding of the sum only
    mean = total / n
    second = float(np.dot(excess, excess)) / n
    spread = max(second - mean * mean, 0.0) * n / (n - 1)
    return es, math.sqrt(spread / n) / (1.0 - q)


def summarise_losses(losses: np.ndarray) -> dict[str, float | int]:
    """Risk measures of a simulated loss distribution, with their Monte Carlo standard errors.

    Definitions (``n`` simulations, ``x_(k)`` the k-th smallest loss):

    * ``expected_loss`` is the sample mean; ``std`` the sample standard deviation (ddof = 1);
    * ``p10``, ``p50``, ``p90``, ``var_99``, ``var_999`` are empirical quantiles by inversion of
      the empirical CDF, ``x_(ceil(n q))``: the smallest simulated loss with at least a share
      ``q`` of simulations at or below it (numpy's ``inverted_cdf``);
    * ``es_99``, ``es_999`` (expected shortfall) are the mean of the worst share ``1 - q`` of the
      simulations, ``(1 / (1 - q)) * integral_q^1 F_n^-1(u) du``: losses above the VaR count
      fully and the atom at the VaR counts for the part of it inside the tail (Acerbi and
      Tasche). Taking every loss at or above the VaR instead biases the ES low whenever the
      VaR sits on an atom, down to the expected loss when the VaR is the zero loss;
    * ``se_expected_loss`` is ``std / sqrt(n)``;
    * ``se_<quantile>`` is distribution-free (see :func:`_quantile_se`): the order statistics
      at the 2.5% and 97.5% quantiles of Binomial(n, q) bracket the true quantile with about
      95% probability; the SE is that bracket's width divided by ``2 * 1.96``. When ``n q`` or
      ``n (1 - q)`` is tiny the bracket is clipped to the sample range and the SE is
      understated: raise ``n_sims``;
    * ``se_es_<level>`` is the influence-function standard error (see
      :func:`_expected_shortfall`), ``sd((L - VaR)^+) / ((1 - q) sqrt(n))``.

    Parameters
    ----------
    losses : numpy.ndarray
        Simulated portfolio losses, at least two, all finite.

    Returns
    -------
    dict
        The keys above as Python floats, and ``n_sims`` as an int.

    Raises
    ------
    LoanBookError
        When fewer than two losses are given or one is not finite.
    """
    x = np.asarray(losses, dtype=np.float64).ravel()
    if x.size < 2:
        raise LoanBookError(f"summarise_losses needs at least 2 simulated losses, got {x.size}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x))[0])
        raise LoanBookError(f"simulated loss {bad} is {x[bad]!r}: losses must be finite")
    ordered = np.sort(x)
    n = ordered.size
    mean = float(np.mean(x))
    std = float(np.std(x, ddof=1))
    summary: dict[str, float | int] = {"expected_loss": mean, "std": std}
    for key, q in SUMMARY_QUANTILES.items():
        summary[key] = _order_statistic(ordered, _quantile_rank(n, q))
    es_se = {}
    for key, q in ES_LEVELS.items():
        summary[key], es_se[key] = _expected_shortfall(ordered, q)
    summary["se_expected_loss"] = std / math.sqrt(n)
    for key, q in SUMMARY_QUANTILES.items():
        summary["se_" + key] = _quantile_se(ordered, q)
    for key, se in es_se.items():
        summary["se_" + key] = se
    summary["n_sims"] = int(n)
    return summary


# --------------------------------------------------------------------------- risk contributions

CONTRIBUTION_LEVEL = 0.99
"""Level of the VaR and ES whose Euler allocation :func:`euler_contributions` computes."""

VAR_WINDOW = 0.1
"""Half-width of the VaR window in ranks, as a share of the tail's ``n (1 - q)`` simulations."""

_SUMS = ("above", "above_sq", "atom", "atom_sq", "window", "window_sq", "window_cross")


@dataclass(frozen=True)
class TailSpec:
    """Where the tail of the first pass lies: what the second pass needs to allocate it.

    Attributes
    ----------
    level : float
        The level ``q`` of the VaR and ES allocated.
    var : float
        The empirical VaR, ``x_(ceil(n q))``.
    atom_weight : float
        Share ``theta = (F_n(VaR) - q) / P_n(L = VaR)`` of the simulations at the VaR that
        belongs to the ES tail (Acerbi-Tasche weighting), in ``[0, 1]``.
    window_lo, window_hi : float
        Losses bounding the VaR window: the order statistics ``VAR_WINDOW * n (1 - q)`` ranks
        below and above the VaR (at least one).
    n_sims, n_above, n_atom, n_window : int
        Simulations in all, above the VaR, at the VaR and in the window: the second pass must
        reproduce these counts exactly, which proves it saw the same losses.
    """

    level: float
    var: float
    atom_weight: float
    window_lo: float
    window_hi: float
    n_sims: int
    n_above: int
    n_atom: int
    n_window: int


def tail_spec(
    losses: np.ndarray, level: float = CONTRIBUTION_LEVEL, window: float = VAR_WINDOW
) -> TailSpec:
    """The tail of a first pass of simulated losses, for :func:`contribution_chunk`.

    Parameters
    ----------
    losses : numpy.ndarray
        Every simulated loss of the run, in simulation order.
    level : float, default :data:`CONTRIBUTION_LEVEL`
        Level of the VaR and ES to allocate, in ``(0, 1)``.
    window : float, default :data:`VAR_WINDOW`
        Half-width of the VaR window as a share of the tail's simulations.

    Returns
    -------
    TailSpec
        The VaR, the atom weight, the window and the counts.
    """
    _check_probability("level", level, open_interval=True)
    ordered = np.sort(np.asarray(losses, dtype=np.float64).ravel())
    n = ordered.size
    if n < 2:
        raise LoanBookError(f"tail_spec needs at least 2 simulated losses, got {n}")
    rank = _quantile_rank(n, level)
    var = _order_statistic(ordered, rank)
    n_lt = int(np.searchsorted(ordered, var, side="left"))
    n_le = int(np.searchsorted(ordered, var, side="right"))
    theta = min(max((n_le - n * level) / (n_le - n_lt), 0.0), 1.0)
    half = max(1, math.ceil(window * n * (1.0 - level)))
    lo = _order_statistic(ordered, rank - half)
    hi = _order_statistic(ordered, rank + half)
    in_window = int(np.searchsorted(ordered, hi, "right") - np.searchsorted(ordered, lo, "left"))
    return TailSpec(
        level=float(level),
        var=var,
        atom_weight=float(theta),
        window_lo=lo,
        window_hi=hi,
        n_sims=int(n),
        n_above=n - n_le,
        n_atom=n_le - n_lt,
        n_window=in_window,
    )


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a + b`` as ``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@dataclass
class ContributionSums:
    """Additive sums over simulations from which :func:`euler_contributions` allocates the tail.

    For every group ``g`` (each loan, and each group of an optional partition such as the
    segments) and its loss ``G_g`` in a simulation with portfolio loss ``L``: ``above`` sums
    ``G_g`` over ``L > VaR``, ``atom`` over ``L = VaR``, ``window`` over the VaR window,
    ``*_sq`` the same sums of ``G_g^2`` and ``window_cross`` sums ``G_g * L`` in the window.

    Each sum is kept as an unevaluated pair ``hi + lo`` accumulated block by block with
    error-free additions (Knuth's TwoSum), so that the total is the exact sum of the blocks'
    values to about 1e-26 relative and rounds to the same float whatever the chunks were:
    a Spark run with another chunk size, or a Databricks run, gives the local run's floats.
    :meth:`to_bytes` carries the pairs across processes exactly.
    """

    n_sims: int
    n_above: int
    n_atom: int
    n_window: int
    parts: dict[str, np.ndarray]  # name -> (2, size) array of hi and lo parts

    @classmethod
    def zeros(cls, n_loans: int, n_groups: int) -> "ContributionSums":
        """Empty sums for a book of ``n_loans`` loans and a partition into ``n_groups``."""
        parts = {"window": np.zeros((2, 2))}
        for prefix, size in (("loans", n_loans), ("groups", n_groups)):
            parts.update({f"{prefix}.{k}": np.zeros((2, size)) for k in _SUMS})
        return cls(n_sims=0, n_above=0, n_atom=0, n_window=0, parts=parts)

    def add(self, name: str, values: np.ndarray) -> None:
        """Add one block's ``values`` to the sum ``name`` without rounding error."""
        pair = self.parts[name]
        pair[0], error = _two_sum(pair[0], values)
        pair[1] += error

    def merge(self, other: "ContributionSums") -> "ContributionSums":
        """Sums over the simulations of both."""
        parts = {}
        for name, pair in self.parts.items():
            hi, error = _two_sum(pair[0], other.parts[name][0])
            parts[name] = np.stack([hi, pair[1] + other.parts[name][1] + error])
        return ContributionSums(
            n_sims=self.n_sims + other.n_sims,
            n_above=self.n_above + other.n_above,
            n_atom=self.n_atom + other.n_atom,
            n_window=self.n_window + other.n_window,
            parts=parts,
        )

    def _totals(self, prefix: str) -> dict[str, np.ndarray]:
        return {k: self.parts[f"{prefix}.{k}"][0] + self.parts[f"{prefix}.{k}"][1] for k in _SUMS}

    @property
    def loans(self) -> dict[str, np.ndarray]:
        """The sums per loan, in the book's order."""
        return self._totals("loans")

    @property
    def groups(self) -> dict[str, np.ndarray]:
        """The sums per group of the partition."""
        return self._totals("groups")

    @property
    def window_loss(self) -> float:
        """Sum of the portfolio losses in the VaR window."""
        return float(self.parts["window"][0, 0] + self.parts["window"][1, 0])

    @property
    def window_loss_sq(self) -> float:
        """Sum of the squared portfolio losses in the VaR window."""
        return float(self.parts["window"][0, 1] + self.parts["window"][1, 1])

    def to_bytes(self) -> bytes:
        """The sums as ``.npz`` bytes (float64 exact, no pickle)."""
        buffer = io.BytesIO()
        counts = [self.n_sims, self.n_above, self.n_atom, self.n_window]
        np.savez(buffer, counts=np.array(counts, dtype=np.int64), **self.parts)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ContributionSums":
        """The sums written by :meth:`to_bytes`."""
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            counts = npz["counts"].tolist()
            return cls(*counts, parts={k: npz[k] for k in npz.files if k != "counts"})


def _add_group_sums(
    sums: ContributionSums,
    prefix: str,
    codes: np.ndarray,
    n_codes: int,
    sims: np.ndarray,
    values: np.ndarray,
    losses: np.ndarray,
    above: np.ndarray,
    atom: np.ndarray,
    window: np.ndarray,
) -> None:
    """Add one block's group losses in the tail simulations to the sums under ``prefix``."""
    key = sims * n_codes + codes
    unique, inverse = np.unique(key, return_inverse=True)
    g_loss = np.bincount(inverse, weights=values)
    g_sim, g = np.divmod(unique, n_codes)
    for name, mask in (("above", above), ("atom", atom), ("window", window)):
        sel = mask[g_sim]
        gl = g_loss[sel]
        sums.add(f"{prefix}.{name}", np.bincount(g[sel], weights=gl, minlength=n_codes))
        sums.add(f"{prefix}.{name}_sq", np.bincount(g[sel], weights=gl * gl, minlength=n_codes))
        if name == "window":
            cross = gl * losses[g_sim[sel]]
            sums.add(
                f"{prefix}.window_cross", np.bincount(g[sel], weights=cross, minlength=n_codes)
            )


def contribution_chunk(
    loans_arrays: LoanArrays,
    *,
    pd_multiplier: float,
    rho: float,
    seed: int,
    start: int,
    stop: int,
    tail: TailSpec,
    groups: np.ndarray | None = None,
    n_groups: int = 0,
) -> ContributionSums:
    """Tail sums of simulations ``[start, stop)`` for the Euler allocation: the second pass.

    The simulations are those of :func:`simulate_chunk` with the same arguments (same seed,
    same random numbers, bit-for-bit the same losses), this time recording which loans
    defaulted; only the simulations in the tail or the VaR window (about 1% at 99%) are
    aggregated, per loan and per group, so memory stays one block whatever ``n_sims`` and
    no ``n_sims x n_loans`` array is ever formed. Chunks are independent and their sums add
    up, so a job maps this over the chunk ids exactly as it maps :func:`simulate_chunk`.

    Parameters
    ----------
    loans_arrays : LoanArrays
        The validated loan book.
    pd_multiplier, rho, seed : float, float, int
        The settings of the first pass.
    start, stop : int
        Simulation indices, ``0 <= start <= stop``.
    tail : TailSpec
        :func:`tail_spec` of the first pass's losses.
    groups : numpy.ndarray, optional
        Integer group of each loan (e.g. its segment's code), in ``[0, n_groups)``.
    n_groups : int, default 0
        Number of groups.

    Returns
    -------
    ContributionSums
        The sums of these simulations.
    """
    if not isinstance(loans_arrays, LoanArrays):
        raise LoanBookError(
            f"contribution_chunk needs LoanArrays, got {type(loans_arrays).__name__}"
        )
    _check_settings(pd_multiplier, rho, seed)
    _check_count("start", start, 0)
    _check_count("stop", stop, int(start))
    n_loans = loans_arrays.n_loans
    if groups is None:
        codes, n_groups = np.zeros(n_loans, dtype=np.int64), 0
    else:
        codes = np.asarray(groups)
        if (
            codes.shape != (n_loans,)
            or not np.issubdtype(codes.dtype, np.integer)
            or not (0 <= codes.min() and codes.max() < n_groups)
        ):
            raise LoanBookError(
                f"groups must give each of {n_loans} loans an integer code in [0, {n_groups})"
            )
        codes = codes.astype(np.int64)
    plan = _plan_for(loans_arrays, float(pd_multiplier), float(rho))
    sums = ContributionSums.zeros(n_loans, n_groups)
    positions = np.arange(n_loans, dtype=np.int64)
    for block in range(start // SIMULATION_BLOCK, -(-stop // SIMULATION_BLOCK)):
        log = _BlockDefaults(n=plan.c.size)
        losses = _simulate_block(plan, int(seed), block, log)
        first = block * SIMULATION_BLOCK
        in_range = np.zeros(SIMULATION_BLOCK, dtype=bool)
        in_range[max(start, first) - first : min(stop, first + SIMULATION_BLOCK) - first] = True
        above = in_range & (losses > tail.var)
        atom = in_range & (losses == tail.var)
        window = in_range & (losses >= tail.window_lo) & (losses <= tail.window_hi)
        wl = losses[window]
        sums.n_sims += int(in_range.sum())
        sums.n_above += int(above.sum())
        sums.n_atom += int(atom.sum())
        sums.n_window += int(wl.size)
        sums.add("window", np.array([wl.sum(), np.dot(wl, wl)]))
        selected = above | atom | window
        sims, pos = log.pairs(selected)
        loan = plan.index[pos]
        values = plan.loss[pos]
        if plan.certain_index.size:
            chosen = np.flatnonzero(selected)
            sims = np.r_[sims, np.repeat(chosen, plan.certain_index.size)]
            loan = np.r_[loan, np.tile(plan.certain_index, chosen.size)]
            values = np.r_[values, np.tile(plan.certain_losses, chosen.size)]
        parts = (sims, values, losses, above, atom, window)
        _add_group_sums(sums, "loans", positions[loan], n_loans, *parts)
        if n_groups:
            _add_group_sums(sums, "groups", codes[loan], n_groups, *parts)
    return sums


def check_second_pass(sums: ContributionSums, tail: TailSpec) -> None:
    """Raise unless the second pass saw exactly the first pass's simulations.

    Both passes draw the same random numbers, so the counts above, at and around the VaR must
    agree to the simulation. They differ only when the passes ran different code or builds
    (e.g. Spark workers with another numpy than the driver), and then the allocation would
    not add up to the published figures.

    Raises
    ------
    LoanBookError
        Naming the counts that differ.
    """
    first = (tail.n_sims, tail.n_above, tail.n_atom, tail.n_window)
    second = (sums.n_sims, sums.n_above, sums.n_atom, sums.n_window)
    if first != second:
        raise LoanBookError(
            "the contribution pass did not reproduce the loss simulation: (simulations, above "
            f"VaR, at VaR, in VaR window) = {second} against {first} in the first pass; both "
            "passes must run the same code and numpy build"
        )


def euler_contributions(
    sums: ContributionSums, tail: TailSpec, *, by: str = "loans"
) -> dict[str, np.ndarray]:
    """Euler allocation of the VaR and ES at ``tail.level``, with Monte Carlo standard errors.

    ES contribution of group ``g`` (Acerbi-Tasche weighting of the atom at the VaR)::

        C_g = (sum_{L > VaR} G_g + theta * sum_{L = VaR} G_g) / (n (1 - q))

    These add up to the published ES exactly (to float rounding), since the groups' losses add
    up to the portfolio loss in every simulation. The standard error is that of the
    influence function ``psi_g = (G_g t + c_g (1{L <= VaR} - q)) / (1 - q) - C_g``, with ``t``
    the tail weight (1 above the VaR, ``theta`` at it) and ``c_g = E[G_g | L = VaR]`` the VaR
    contribution: the second term is the effect of estimating the VaR, which does not cancel
    per group although it does for the portfolio.

    VaR contribution: ``E[G_g | L = VaR]``, estimated over the window of simulations ranked
    within :data:`VAR_WINDOW` of the tail size around the VaR and scaled by
    ``VaR / mean(L | window)`` so that the contributions add up to the VaR (a ratio estimator;
    an empty or zero-loss window gives zeros). Its standard error is the ratio estimator's
    over the window's simulations; it leaves out the smoothing bias of the window.

    Parameters
    ----------
    sums : ContributionSums
        Merged sums of every chunk of the run.
    tail : TailSpec
        The first pass's tail.
    by : {"loans", "groups"}
        Allocate to each loan or to each group of the partition.

    Returns
    -------
    dict of str to numpy.ndarray
        ``es``, ``se_es``, ``var``, ``se_var``, one value per loan or group.
    """
    if by not in ("loans", "groups"):
        raise LoanBookError(f"by = {by!r} must be 'loans' or 'groups'")
    g = sums.loans if by == "loans" else sums.groups
    window_loss, window_loss_sq = sums.window_loss, sums.window_loss_sq
    n, q, theta = sums.n_sims, tail.level, tail.atom_weight
    es = (g["above"] + theta * g["atom"]) / (n * (1.0 - q))
    var = np.zeros_like(es)
    se_var = np.zeros_like(es)
    if window_loss > 0.0 and sums.n_window >= 2:
        w = sums.n_window
        ratio = g["window"] / window_loss
        var = tail.var * ratio
        resid = g["window_sq"] - 2.0 * ratio * g["window_cross"] + ratio**2 * window_loss_sq
        mean_loss = window_loss / w
        se_var = tail.var * np.sqrt(np.maximum(resid, 0.0) / (w - 1) / w) / mean_loss
    n_le = n - sums.n_above
    c = var
    total = g["above"] + theta * g["atom"] + c * (n_le - n * q)
    second = (
        g["above_sq"]
        + theta**2 * g["atom_sq"]
        + 2.0 * c * (-q * g["above"] + theta * (1.0 - q) * g["atom"])
        + c**2 * (n_le * (1.0 - q) ** 2 + sums.n_above * q**2)
    )
    spread = np.maximum(second / n - (total / n) ** 2, 0.0) * n / max(n - 1, 1)
    se_es = np.sqrt(spread / n) / (1.0 - q)
    return {"es": es, "se_es": se_es, "var": var, "se_var": se_var}


def contribution_table(
    book: LoanArrays,
    segments: Sequence[str],
    sums: ContributionSums,
    tail: TailSpec,
    *,
    top_loans: int = 10,
) -> pl.DataFrame:
    """Euler contributions to the VaR and ES at ``tail.level`` per segment and for the top loans.

    Parameters
    ----------
    book : LoanArrays
        The simulated book.
    segments : sequence of str
        Segment of each loan, in the book's order; the groups of ``sums`` are the sorted
        distinct segments (see :func:`segment_codes`).
    sums : ContributionSums
        Merged sums of the contribution pass.
    tail : TailSpec
        The first pass's tail.
    top_loans : int, default 10
        How many loans to list individually: those with the largest ES contributions.

    Returns
    -------
    polars.DataFrame
        One row per segment (``kind = "segment"``, ``loan_id`` null) and per top loan
        (``kind = "loan"``, with its ``rank``), with ``segment``, ``n_loans``, ``exposure``
        (sum of EAD * LGD), ``es_contribution``, ``se_es_contribution``,
        ``var_contribution``, ``se_var_contribution`` and ``es_share`` (of the portfolio ES).
        Segment rows add up to the portfolio's ES and VaR.
    """
    _check_count("top_loans", top_loans, 0)
    names, codes = segment_codes(segments)
    if codes.size != book.n_loans:
        raise LoanBookError(f"{codes.size} segments given for {book.n_loans} loans")
    by_loan = euler_contributions(sums, tail)
    by_segment = euler_contributions(sums, tail, by="groups")
    exposure = book.loss_given_default
    es_total = float(by_segment["es"].sum())
    share = 1.0 / es_total if es_total else 0.0
    seg_exposure = np.bincount(codes, weights=exposure, minlength=len(names))
    seg_count = np.bincount(codes, minlength=len(names))
    rows = [
        {
            "kind": "segment",
            "segment": name,
            "loan_id": None,
            "rank": None,
            "n_loans": int(seg_count[g]),
            "exposure": float(seg_exposure[g]),
            "es_contribution": float(by_segment["es"][g]),
            "se_es_contribution": float(by_segment["se_es"][g]),
            "var_contribution": float(by_segment["var"][g]),
            "se_var_contribution": float(by_segment["se_var"][g]),
            "es_share": float(by_segment["es"][g]) * share,
        }
        for g, name in enumerate(names)
    ]
    order = np.argsort(-by_loan["es"], kind="stable")[: min(top_loans, book.n_loans)]
    rows += [
        {
            "kind": "loan",
            "segment": names[codes[i]],
            "loan_id": str(_plain(book.loan_id[i])),
            "rank": rank,
            "n_loans": 1,
            "exposure": float(exposure[i]),
            "es_contribution": float(by_loan["es"][i]),
            "se_es_contribution": float(by_loan["se_es"][i]),
            "var_contribution": float(by_loan["var"][i]),
            "se_var_contribution": float(by_loan["se_var"][i]),
            "es_share": float(by_loan["es"][i]) * share,
        }
        for rank, i in enumerate(order.tolist(), start=1)
    ]
    return pl.DataFrame(rows, schema=_CONTRIBUTION_SCHEMA)


_CONTRIBUTION_SCHEMA = {
    "kind": pl.String,
    "segment": pl.String,
    "loan_id": pl.String,
    "rank": pl.Int64,
    "n_loans": pl.Int64,
    "exposure": pl.Float64,
    "es_contribution": pl.Float64,
    "se_es_contribution": pl.Float64,
    "var_contribution": pl.Float64,
    "se_var_contribution": pl.Float64,
    "es_share": pl.Float64,
}


def segment_codes(segments: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The sorted distinct segments and each loan's code into them.

    Parameters
    ----------
    segments : sequence of str
        Segment of each loan; a missing segment becomes ``"unassigned"``.

    Returns
    -------
    tuple
        ``(names, codes)``: the distinct segments and an int64 code per loan.
    """
    labels = np.array(["unassigned" if s is None else str(s) for s in segments], dtype=object)
    names, codes = np.unique(labels.astype(str), return_inverse=True)
    return [str(n) for n in names], codes.astype(np.int64).ravel()


def contributions_failure(
    summary: Mapping[str, Any], contributions: pl.DataFrame, rel_tol: float = 1e-9
) -> str | None:
    """Gate: the segment contributions add up to the published VaR and ES.

    Parameters
    ----------
    summary : mapping
        A stored summary row (``var_99`` and ``es_99`` at :data:`CONTRIBUTION_LEVEL`).
    contributions : polars.DataFrame
        The scenario's rows of :func:`contribution_table`.
    rel_tol : float, default 1e-9
        Allowed relative difference (float rounding of the sums).

    Returns
    -------
    str or None
        A message naming each figure and both values when they differ, else ``None``.
    """
    segments = contributions.filter(pl.col("kind") == "segment")
    if segments.height == 0:
        return "no segment contributions stored"
    problems = []
    for figure, column in (("es_99", "es_contribution"), ("var_99", "var_contribution")):
        total = math.fsum(segments[column].to_list())
        value = float(summary[figure])
        if abs(total - value) > rel_tol * max(abs(value), 1.0):
            problems.append(
                f"segment {column}s add up to {total:.10g}, not {figure} = {value:.10g}"
            )
    return "; ".join(problems) if problems else None


# --------------------------------------------------------------------------- gates


def expected_loss_within_se(
    summary: dict[str, Any], analytic: float, n_se: float = 3.0
) -> str | None:
    """Gate: the simulated mean agrees with the analytic expected loss within ``n_se`` SE.

    The mean loss is known exactly (:func:`analytic_expected_loss`), so a larger gap than Monte
    Carlo noise explains means the simulator or its inputs are wrong. Under a correct simulator
    the gate fails with probability ``2 (1 - Phi(n_se))`` (0.27% at 3 SE).

    Parameters
    ----------
    summary : dict
        Output of :func:`summarise_losses`.
    analytic : float
        The exact expected loss.
    n_se : float, default 3.0
        Allowed number of standard errors.

    Returns
    -------
    str or None
        A failure message naming the values and the bound, or ``None`` when the gate holds.
    """
    el = float(summary["expected_loss"])
    se = float(summary["se_expected_loss"])
    diff = abs(el - analytic)
    # a loss that is deterministic (every stressed PD 0 or 1) has se 0: allow rounding only
    bound = n_se * se if se > 0.0 else 1e-9 * max(1.0, abs(analytic))
    if diff <= bound:
        return None
    n_sims = int(summary["n_sims"])
    sigmas = f"{diff / se:.1f} standard errors" if se > 0.0 else "a deterministic loss"
    p_false = 2.0 * float(special.ndtr(-n_se))
    return (
        f"simulated expected loss {el:.6g} differs from the analytic expected loss "
        f"sum(EAD*LGD*min(PD*m,1)) = {analytic:.6g} by {diff:.6g} ({sigmas}); bound: "
        f"{n_se:g} SE = {bound:.6g} with n_sims = {n_sims:,}. A correct simulator fails this "
        f"with probability {p_false:.2%}, so suspect the loan book or scenario inputs first; "
        "more simulations shrink the SE and will not hide a real mismatch"
    )


def validate_bounds(bounds: Mapping[str, float]) -> dict[str, float]:
    """Check relative SE bounds: known figures, each bound ``> 0`` (``inf``: not gated).

    Returns
    -------
    dict of str to float
        The bounds as floats.

    Raises
    ------
    LoanBookError
        Naming the unknown figure or the bad bound.
    """
    for figure, bound in bounds.items():
        if figure not in SUMMARY_FIGURES:
            raise LoanBookError(
                f"no Monte Carlo error bound is defined for {figure!r}; "
                f"figures are {', '.join(SUMMARY_FIGURES)}"
            )
        if not isinstance(bound, int | float) or math.isnan(bound) or not bound > 0.0:
            raise LoanBookError(
                f"relative SE bound of {figure} = {bound!r} must be > 0 (inf: not gated)"
            )
    return {figure: float(bound) for figure, bound in bounds.items()}


def mc_error_shortfalls(
    summary: Mapping[str, Any], bounds: Mapping[str, float] = DEFAULT_MAX_RELATIVE_SE
) -> list[dict[str, Any]]:
    """Every figure whose Monte Carlo standard error exceeds its relative bound.

    The relative SE falls as ``1 / sqrt(n_sims)``, so the number of simulations that meets a
    bound is ``ceil(n * (relative_se / bound)**2)``. A figure with SE 0 is exact (e.g. a
    quantile on an atom, or a deterministic loss) and always passes; a figure that is 0 with a
    positive SE has an unbounded relative error and fails with ``n_sims_needed = None``.

    Parameters
    ----------
    summary : mapping
        Output of :func:`summarise_losses` (or a stored summary row holding the same keys).
    bounds : mapping of str to float, default :data:`DEFAULT_MAX_RELATIVE_SE`
        Largest acceptable ``se / |value|`` per figure of :data:`SUMMARY_FIGURES`; ``inf``
        leaves a figure ungated.

    Returns
    -------
    list of dict
        One dict per failing figure, in the order of ``bounds``: ``figure``, ``value``,
        ``se``, ``relative_se``, ``bound``, ``n_sims`` and ``n_sims_needed``.

    Raises
    ------
    LoanBookError
        When a bound is not positive or names an unknown figure.
    """
    validate_bounds(bounds)
    n = int(summary["n_sims"])
    failing = []
    for figure, bound in bounds.items():
        value, se = abs(float(summary[figure])), float(summary["se_" + figure])
        if se == 0.0 or math.isinf(bound):
            continue
        relative = se / value if value else math.inf
        if relative <= bound:
            continue
        needed = math.ceil(n * (relative / bound) ** 2) if value else None
        failing.append(
            {
                "figure": figure,
                "value": value,
                "se": se,
                "relative_se": relative,
                "bound": float(bound),
                "n_sims": n,
                "n_sims_needed": needed,
            }
        )
    return failing


def mc_error_failure(
    summary: Mapping[str, Any], bounds: Mapping[str, float] = DEFAULT_MAX_RELATIVE_SE
) -> str | None:
    """Gate: the Monte Carlo standard error of every figure is within its relative bound.

    Parameters
    ----------
    summary : mapping
        Output of :func:`summarise_losses` (or a stored summary row holding the same keys).
    bounds : mapping of str to float, default :data:`DEFAULT_MAX_RELATIVE_SE`
        Largest acceptable ``se / |value|`` per figure (see :func:`mc_error_shortfalls`).

    Returns
    -------
    str or None
        A failure message naming each failing figure, its relative SE, its bound and the
        ``n_sims`` it needs, or ``None`` when every figure meets its bound.
    """
    problems = []
    for f in mc_error_shortfalls(summary, bounds):
        if f["n_sims_needed"] is None:
            problems.append(
                f"{f['figure']} is 0 with standard error {f['se']:.6g}, so its relative error "
                f"is unbounded at n_sims = {f['n_sims']:,}; raise n_sims until it is resolved"
            )
        else:
            problems.append(
                f"{f['figure']}: relative standard error {f['relative_se']:.3%} (se "
                f"{f['se']:.6g} on {f['value']:.6g}) above its bound {f['bound']:.3%} with "
                f"n_sims = {f['n_sims']:,}; needs n_sims >= {f['n_sims_needed']:,}"
            )
    return "; ".join(problems) if problems else None


def n_sims_needed(
    summary: Mapping[str, Any], bounds: Mapping[str, float] = DEFAULT_MAX_RELATIVE_SE
) -> int | None:
    """Simulations for every figure of ``summary`` to meet its bound (SE ~ 1 / sqrt(n)).

    Returns
    -------
    int or None
        ``max(n_sims, ceil(n * (relative_se / bound)**2))`` over the figures, or ``None``
        when a figure that is 0 has a positive SE (its need cannot be projected).
    """
    needed = [int(summary["n_sims"])]
    for f in mc_error_shortfalls(summary, bounds):
        if f["n_sims_needed"] is None:
            return None
        needed.append(f["n_sims_needed"])
    return max(needed)


def next_n_sims(n_sims: int, budget: int) -> int:
    """The simulation count of the next round of an automatic run: double, within budget.

    A simulation's loss depends on its index and the seed only, so the next round simulates
    ``[n_sims, next)`` and appends it; the result equals a single run of ``next`` simulations.

    Parameters
    ----------
    n_sims : int
        Simulations so far, ``>= 1``.
    budget : int
        Largest number of simulations allowed, ``>= n_sims``.

    Returns
    -------
    int
        ``min(2 n_sims, budget)``; equal to ``n_sims`` when the budget is spent.
    """
    _check_count("n_sims", n_sims, 1)
    _check_count("budget", budget, int(n_sims))
    return min(2 * int(n_sims), int(budget))


# --------------------------------------------------------------------------- Vasicek


def _check_probability(name: str, value: float, *, open_interval: bool = False) -> None:
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not (isinstance(value, int | float | np.floating | np.integer) and ok):
        bounds = "(0, 1)" if open_interval else "[0, 1]"
        raise LoanBookError(f"{name} = {value!r} must lie in {bounds}")


def vasicek_loss_quantile(pd: float, rho: float, q: float) -> float:
    """Quantile of the loss fraction of an infinitely granular homogeneous portfolio.

    With infinitely many loans of equal PD and exposure the loss fraction is ``p(Z)``, the
    conditional PD, which is decreasing in ``Z``; hence its ``q``-quantile is
    ``Phi((Phi^-1(pd) + sqrt(rho) Phi^-1(q)) / sqrt(1 - rho))``.

    Parameters
    ----------
    pd : float
        Probability of default in ``[0, 1]``.
    rho : float
        Asset correlation in ``[0, 1)``.
    q : float
        Quantile level in ``(0, 1)``.

    Returns
    -------
    float
        The loss fraction (share of exposure lost, with LGD = 1) at level ``q``.
    """
    _check_probability("pd", pd)
    _check_rho(rho)
    _check_probability("q", q, open_interval=True)
    if pd in (0.0, 1.0):
        return float(pd)
    x = (special.ndtri(pd) + math.sqrt(rho) * special.ndtri(q)) / math.sqrt(1.0 - rho)
    return float(special.ndtr(x))


def vasicek_loss_cdf(x: float | np.ndarray, pd: float, rho: float) -> float | np.ndarray:
    """CDF of the Vasicek loss fraction of an infinitely granular homogeneous portfolio.

    ``P(L <= x) = Phi((sqrt(1 - rho) Phi^-1(x) - Phi^-1(pd)) / sqrt(rho))``, the inverse of
    :func:`vasicek_loss_quantile` in ``x``.
    For ``rho = 0`` the loss fraction is the constant ``pd`` (law of large numbers) and the CDF
    is the step ``1[x >= pd]``; ``pd = 0`` and ``pd = 1`` give steps at 0 and 1 likewise.

    Parameters
    ----------
    x : float or numpy.ndarray
        Loss fractions in ``[0, 1]``.
    pd : float
        Probability of default in ``[0, 1]``.
    rho : float
        Asset correlation in ``[0, 1)``.

    Returns
    -------
    float or numpy.ndarray
        ``P(L <= x)``, with the shape of ``x``.
    """
    _check_probability("pd", pd)
    _check_rho(rho)
    arr = np.asarray(x, dtype=np.float64)
    if not ((arr >= 0.0) & (arr <= 1.0)).all():
        raise LoanBookError(f"loss fractions x must lie in [0, 1], got {x!r}")
    if rho == 0.0 or pd in (0.0, 1.0):
        out = (arr >= pd).astype(np.float64)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (math.sqrt(1.0 - rho) * special.ndtri(arr) - special.ndtri(pd)) / math.sqrt(rho)
        out = special.ndtr(z)
    return float(out) if np.ndim(x) == 0 else out


_GRID_Z = np.linspace(-9.0, 9.0, 20_001)
_GRID_WEIGHTS = np.exp(-0.5 * _GRID_Z**2)
_GRID_WEIGHTS /= _GRID_WEIGHTS.sum()


def finite_portfolio_default_cdf(k: int, pd: float, rho: float, *, n_loans: int) -> float:
    """``P(D <= k)`` for the default count ``D`` of ``n_loans`` identical loans.

    Given ``Z`` the count is Binomial(n, p(Z)); the mixture over ``Z`` is integrated on a
    uniform grid of 20,001 points over ``[-9, 9]`` (mass outside below 1e-18), fine enough to
    resolve the binomial's transition in ``Z`` for books up to millions of loans. This is the
    exact law the simulator must reproduce on a homogeneous book, computed without simulation.

    Parameters
    ----------
    k : int
        Number of defaults.
    pd : float
        PD of every loan, in ``[0, 1]``.
    rho : float
        Asset correlation in ``[0, 1)``.
    n_loans : int
        Number of loans, ``>= 1``.

    Returns
    -------
    float
        ``P(D <= k)``.
    """
    _check_probability("pd", pd)
    _check_rho(rho)
    _check_count("n_loans", n_loans, 1)
    if pd in (0.0, 1.0):
        return 1.0 if k >= n_loans * pd else 0.0
    p = special.ndtr((special.ndtri(pd) - math.sqrt(rho) * _GRID_Z) / math.sqrt(1.0 - rho))
    return float(np.dot(_GRID_WEIGHTS, special.bdtr(k, n_loans, p)))


def finite_portfolio_default_pmf(pd: float, rho: float, *, n_loans: int) -> np.ndarray:
    """Exact law of the default count ``D`` of ``n_loans`` identical loans.

    ``P(D = k) = integral Binom(k; n, p(z)) phi(z) dz`` with
    ``p(z) = Phi((Phi^-1(pd) - sqrt(rho) z) / sqrt(1 - rho))``, integrated on the uniform grid
    of :func:`finite_portfolio_default_cdf` (20,001 points over ``[-9, 9]``; the trapezoid rule
    converges geometrically for a smooth integrand under a Gaussian weight, and the mass
    outside is below 1e-18). A homogeneous book's losses are ``k * EAD * LGD``, so this is the
    exact finite-portfolio loss distribution the simulator is verified against.

    Parameters
    ----------
    pd : float
        PD of every loan, in ``[0, 1]``.
    rho : float
        Asset correlation in ``[0, 1)``.
    n_loans : int
        Number of loans, ``>= 1``.

    Returns
    -------
    numpy.ndarray
        ``n_loans + 1`` probabilities ``P(D = k)``, ``k = 0 .. n_loans``, summing to 1.
    """
    _check_probability("pd", pd)
    _check_rho(rho)
    _check_count("n_loans", n_loans, 1)
    k = np.arange(n_loans + 1)
    if pd in (0.0, 1.0):
        return (k == round(n_loans * pd)).astype(np.float64)
    p = special.ndtr((special.ndtri(pd) - math.sqrt(rho) * _GRID_Z) / math.sqrt(1.0 - rho))
    pmf = np.zeros(n_loans + 1)
    step = max(1, (1 << 20) // (n_loans + 1))
    for lo in range(0, p.size, step):
        pmf += _GRID_WEIGHTS[lo : lo + step] @ stats.binom.pmf(
            k[None, :], n_loans, p[lo : lo + step, None]
        )
    return pmf / pmf.sum()


def discrete_var_es(
    values: np.ndarray, probabilities: np.ndarray, level: float
) -> tuple[float, float]:
    """Exact VaR and expected shortfall of a discrete loss law.

    ``VaR = min{x : P(L <= x) >= level}`` and Acerbi and Tasche's
    ``ES = (E[L 1{L > VaR}] + VaR (P(L <= VaR) - level)) / (1 - level)``, which weights the
    atom at the VaR by the share of it inside the tail.

    Parameters
    ----------
    values : numpy.ndarray
        Distinct loss values in increasing order.
    probabilities : numpy.ndarray
        Their probabilities (summing to 1).
    level : float
        Level in ``(0, 1)``.

    Returns
    -------
    tuple of float
        ``(VaR, ES)``.
    """
    _check_probability("level", level, open_interval=True)
    x = np.asarray(values, dtype=np.float64)
    prob = np.asarray(probabilities, dtype=np.float64)
    if x.shape != prob.shape or x.ndim != 1 or (np.diff(x) <= 0).any():
        raise LoanBookError("values must be distinct, increasing and match the probabilities")
    cdf = np.cumsum(prob)
    at = min(int(np.searchsorted(cdf, level, side="left")), x.size - 1)
    var = float(x[at])
    above = math.fsum((x[at + 1 :] * prob[at + 1 :]).tolist())
    return var, (above + var * (float(cdf[at]) - level)) / (1.0 - level)


def finite_portfolio_loss_quantile(pd: float, rho: float, q: float, *, n_loans: int) -> float:
    """Exact ``q``-quantile of the loss fraction of ``n_loans`` identical loans (EAD = LGD = 1).

    The Vasicek formula is the ``n_loans -> infinity`` limit; this is the finite book's
    quantile, ``k / n`` for the smallest default count ``k`` with ``P(D <= k) >= q``, found by
    bisection on the binomial mixture computed by quadrature. It measures the granularity
    gap that :func:`vasicek_comparison` must tolerate, independently of the simulator.

    Parameters
    ----------
    pd : float
        PD of every loan, in ``[0, 1]``.
    rho : float
        Asset correlation in ``[0, 1)``.
    q : float
        Quantile level in ``(0, 1)``.
    n_loans : int
        Number of loans, ``>= 1``.

    Returns
    -------
    float
        The loss fraction at level ``q`` (a multiple of ``1 / n_loans``).
    """
    _check_probability("pd", pd)
    _check_rho(rho)
    _check_probability("q", q, open_interval=True)
    _check_count("n_loans", n_loans, 1)
    lo, hi = 0, int(n_loans)
    while lo < hi:
        mid = (lo + hi) // 2
        if finite_portfolio_default_cdf(mid, pd, rho, n_loans=n_loans) >= q:
            hi = mid
        else:
            lo = mid + 1
    return lo / n_loans


def vasicek_comparison(
    loss_fraction: np.ndarray,
    pd: float,
    rho: float,
    *,
    n_loans: int,
    quantiles: Sequence[float] = (0.1, 0.5, 0.9, 0.99),
) -> dict[str, Any]:
    """Compare simulated loss-fraction quantiles of a homogeneous book with the closed form.

    The tolerance at level ``q`` adds three terms, each a documented source of difference:

    * Monte Carlo error: :data:`VASICEK_MC_SE_MULTIPLE` (4) order-statistic standard errors of
      the simulated quantile (a false alarm rate below 1e-4 per quantile);
    * granularity: the Vasicek formula is the limit of infinitely many loans, while the
      simulated book has ``N``; the exact gap between the ``N``-loan quantile
      (:func:`finite_portfolio_loss_quantile`, by quadrature) and the limit is allowed in full;
    * lattice: an ``N``-loan loss fraction moves in steps of ``1 / N``, so an empirical quantile
      sitting on the edge of an atom may land one step away: ``1 / N`` is allowed for that.

    Parameters
    ----------
    loss_fraction : numpy.ndarray
        Simulated losses divided by total exposure.
    pd, rho : float
        Parameters of the closed form (those the book was meant to be simulated with).
    n_loans : int
        Loans in the simulated book.
    quantiles : sequence of float
        Levels to compare, each in ``(0, 1)``.

    Returns
    -------
    dict
        ``pd``, ``rho``, ``n_loans``, ``n_sims``, ``quantiles`` (a list of dicts with ``q``,
        ``simulated``, ``closed_form``, ``finite_portfolio``, ``mc_se``, ``abs_error``,
        ``tolerance``, ``ok``) and ``passed``.
    """
    _check_count("n_loans", n_loans, 1)
    ordered = np.sort(np.asarray(loss_fraction, dtype=np.float64).ravel())
    if ordered.size < 2:
        raise LoanBookError(f"need at least 2 simulated loss fractions, got {ordered.size}")
    rows = []
    for q in quantiles:
        closed = vasicek_loss_quantile(pd, rho, q)
        finite = finite_portfolio_loss_quantile(pd, rho, q, n_loans=n_loans)
        simulated = _order_statistic(ordered, _quantile_rank(ordered.size, q))
        se = _quantile_se(ordered, q)
        tolerance = VASICEK_MC_SE_MULTIPLE * se + abs(finite - closed) + 1.0 / n_loans
        error = abs(simulated - closed)
        rows.append(
            {
                "q": float(q),
                "simulated": simulated,
                "closed_form": closed,
                "finite_portfolio": finite,
                "mc_se": se,
                "abs_error": error,
                "tolerance": tolerance,
                "ok": bool(error <= tolerance),
            }
        )
    return {
        "pd": float(pd),
        "rho": float(rho),
        "n_loans": int(n_loans),
        "n_sims": int(ordered.size),
        "quantiles": rows,
        "passed": all(r["ok"] for r in rows),
    }


def reference_portfolio_check(
    pd: float,
    rho: float,
    *,
    n_loans: int,
    n_sims: int,
    seed: int,
    quantiles: Sequence[float] = (0.1, 0.5, 0.9, 0.99),
) -> dict[str, Any]:
    """Simulate a homogeneous reference book and compare it with the Vasicek closed form.

    The book has ``n_loans`` loans with the given PD, EAD 1 and LGD 1, so the loss divided by
    ``n_loans`` is the loss fraction whose large-portfolio quantiles are
    :func:`vasicek_loss_quantile`. This checks the simulator (copula, factor loading, threshold)
    against an independent closed form; see :func:`vasicek_comparison` for the tolerance.

    Parameters
    ----------
    pd : float
        PD of every loan, in ``[0, 1]``.
    rho : float
        Asset correlation in ``[0, 1)``.
    n_loans : int
        Loans in the reference book (e.g. 5,000).
    n_sims : int
        Simulations.
    seed : int
        Non-negative seed.
    quantiles : sequence of float, default (0.1, 0.5, 0.9, 0.99)
        Levels to compare.

    Returns
    -------
    dict
        As :func:`vasicek_comparison`, with ``passed`` the overall flag.
    """
    _check_probability("pd", pd)
    _check_count("n_loans", n_loans, 1)
    book = LoanArrays(
        loan_id=np.arange(n_loans),
        pd=np.full(n_loans, float(pd)),
        ead=np.ones(n_loans),
        lgd=np.ones(n_loans),
    )
    losses = simulate_portfolio_loss(book, pd_multiplier=1.0, rho=rho, n_sims=n_sims, seed=seed)
    return vasicek_comparison(losses / n_loans, pd, rho, n_loans=n_loans, quantiles=quantiles)


def vasicek_agreement_failure(check: dict[str, Any]) -> str | None:
    """Gate: every quantile of the reference-portfolio check lies within its tolerance.

    Parameters
    ----------
    check : dict
        Output of :func:`reference_portfolio_check` or :func:`vasicek_comparison`.

    Returns
    -------
    str or None
        A failure message naming each failing quantile, its simulated and closed-form values
        and the tolerance, or ``None`` when all agree.
    """
    bad = [r for r in check["quantiles"] if not r["ok"]]
    if not bad:
        return None
    detail = "; ".join(
        f"q={r['q']:g}: simulated {r['simulated']:.6g} vs closed form {r['closed_form']:.6g}, "
        f"|diff| {r['abs_error']:.3g} > tolerance {r['tolerance']:.3g}"
        for r in bad
    )
    return (
        f"homogeneous reference book (pd={check['pd']:g}, rho={check['rho']:g}, "
        f"{check['n_loans']:,} loans, {check['n_sims']:,} simulations) disagrees with the "
        f"Vasicek closed form beyond Monte Carlo and granularity tolerance: {detail}"
    )
