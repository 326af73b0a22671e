"""Power laws of loss against training compute, with bootstrap confidence intervals.

    form "power":   L(C) = a * C^(-b)             fitted as a straight line in log-log (exact least squares)
    form "offset":  L(C) = a * C^(-b) + E         E >= 0 the irreducible loss; scipy least_squares on log L

Both are fitted in log space (residuals log L_i - log L(C_i)), so every run weighs alike whatever its loss level,
as in Kaplan et al. (2020) and Hoffmann et al. (2022). The offset form needs a spread of compute to tell E from
the power-law part; with few points prefer "power" (the exponent of a 2-parameter fit near the data).

Confidence intervals come from a nonparametric bootstrap: resample the runs with replacement (seeded, N times,
1000 by default), refit, take the 2.5 / 97.5 percentiles of each parameter; a resample the form would fit exactly
(fewer distinct compute values than parameters + 1) is skipped and counted. The same refits give the band around the fitted line and the CI of a
family's loss at a matched compute budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from dnascale.errors import ConfigError, DataError

FORMS = ("power", "offset")
_MIN_DISTINCT = {"power": 2, "offset": 3}  # distinct compute values a form needs to be determined
# A bootstrap resample must leave at least one residual degree of freedom: a resample the form fits exactly
# (e.g. 2 distinct points for a line) says nothing about the scatter and gives wild exponents with few runs.
_MIN_DISTINCT_RESAMPLE = {form: n + 1 for form, n in _MIN_DISTINCT.items()}


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    E: float = 0.0

    def __call__(self, flops):
        return self.a * np.asarray(flops, dtype=float) ** (-self.b) + self.E


def _power_fit(log_c: np.ndarray, log_l: np.ndarray) -> PowerLaw:
    slope, intercept = np.polyfit(log_c, log_l, 1)
    return PowerLaw(a=math.exp(float(intercept)), b=-float(slope))


def _offset_fit(log_c: np.ndarray, log_l: np.ndarray) -> PowerLaw:
    from scipy.optimize import least_squares

    # Compute is centred (C / C0) so the coefficient and the exponent are not a huge-number trade-off.
    c0 = float(np.mean(log_c))
    x = log_c - c0
    floor = float(np.exp(log_l.min()))
    loss = np.exp(log_l)

    def residuals(p):
        log_a, b, e = p
        return np.log(np.exp(log_a - b * x) + e) - log_l

    def jacobian(p):
        log_a, b, e = p
        part = np.exp(log_a - b * x)
        total = part + e
        return np.stack([part / total, -x * part / total, 1.0 / total], axis=1)

    # Start from the best straight line of log(L - E) over a grid of E: for a fixed E the rest is linear.
    best = None
    for e in floor * np.array([0.0, 0.25, 0.5, 0.75, 0.9, 0.97]):
        slope, intercept = np.polyfit(x, np.log(loss - e), 1)
        guess = np.array([intercept, min(max(-slope, 1e-3), 9.0), e])
        cost = float(np.sum(residuals(guess) ** 2))
        if best is None or cost < best[0]:
            best = (cost, guess)
    result = least_squares(residuals, best[1], jac=jacobian,
                           bounds=([-np.inf, 0.0, 0.0], [np.inf, 10.0, floor * (1 - 1e-9)]))
    log_a, b, e = result.x
    return PowerLaw(a=math.exp(log_a + b * c0), b=float(b), E=float(e))


def fit_power_law(flops, loss, form: str = "power") -> PowerLaw:
    if form not in FORMS:
        raise ConfigError(f"form={form!r}: choose one of {list(FORMS)}")
    c, l = np.asarray(flops, dtype=float), np.asarray(loss, dtype=float)
    if np.any(c <= 0) or np.any(l <= 0):
        raise DataError("power-law fit: compute and loss must be positive")
    if len(np.unique(c)) < _MIN_DISTINCT[form]:
        raise DataError(f"power-law fit ({form}): needs at least {_MIN_DISTINCT[form]} distinct compute values, "
                        f"got {len(np.unique(c))}")
    fit = _power_fit if form == "power" else _offset_fit
    return fit(np.log(c), np.log(l))


def bootstrap(flops, loss, form: str = "power", n: int = 1000, seed: int = 0) -> tuple[list[PowerLaw], int]:
    """(refits of N resamples of the runs, number of resamples skipped as undetermined)."""
    c, l = np.asarray(flops, dtype=float), np.asarray(loss, dtype=float)
    rng = np.random.default_rng(seed)
    fits, skipped = [], 0
    for _ in range(n):
        pick = rng.integers(0, len(c), len(c))
        if len(np.unique(c[pick])) < _MIN_DISTINCT_RESAMPLE[form]:
            skipped += 1
            continue
        fits.append(fit_power_law(c[pick], l[pick], form))
    return fits, skipped


def _interval(values, level: float) -> list[float]:
    tail = 50 * (1 - level)
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def frontier(points: list[dict]) -> list[dict]:
    """The compute-optimal frontier: runs no other run beats with less or equal compute (lower envelope)."""
    best, kept = math.inf, []
    for p in sorted(points, key=lambda p: (p["flops"], p["loss"])):
        if p["loss"] < best:
            kept.append(p)
            best = p["loss"]
    return kept


@dataclass
class FamilyFit:
    family: str
    form: str
    runs: int
    sizes: int
    a: float
    b: float
    E: float
    a_ci: list[float] | None  # None: too few runs for a bootstrap CI
    b_ci: list[float] | None
    E_ci: list[float] | None
    bootstrap_ok: int
    bootstrap_skipped: int
    rms_log_residual: float
    flops_range: list[float]
    frontier: list[dict]  # run_id, size, params, flops, loss of the runs on the compute-optimal frontier
    band: dict = field(default_factory=dict)  # flops grid and the CI of the fitted loss on it

    @property
    def law(self) -> PowerLaw:
        return PowerLaw(self.a, self.b, self.E)


def fit_family(family: str, points: list[dict], form: str = "power", n_boot: int = 1000, seed: int = 0,
               level: float = 0.95) -> tuple[FamilyFit, list[PowerLaw]]:
    """points: dicts with run_id, size, params, flops, loss (one per run)."""
    c = np.array([p["flops"] for p in points], dtype=float)
    l = np.array([p["loss"] for p in points], dtype=float)
    law = fit_power_law(c, l, form)
    refits, skipped = bootstrap(c, l, form, n_boot, seed)
    grid = np.geomspace(c.min() / 2, c.max() * 2, 40)
    tail = 50 * (1 - level)
    band = {}
    if refits:  # none when the family has too few runs for any resample to leave a residual: no CI, only the fit
        predictions = np.array([f(grid) for f in refits])
        band = {"flops": grid.tolist(), "lo": np.percentile(predictions, tail, axis=0).tolist(),
                "hi": np.percentile(predictions, 100 - tail, axis=0).tolist()}

    def interval(values):
        return _interval(values, level) if refits else None

    return FamilyFit(
        family=family, form=form, runs=len(points), sizes=len({p["size"] for p in points}),
        a=law.a, b=law.b, E=law.E,
        a_ci=interval([f.a for f in refits]), b_ci=interval([f.b for f in refits]),
        E_ci=interval([f.E for f in refits]) if form == "offset" else None,
        bootstrap_ok=len(refits), bootstrap_skipped=skipped,
        rms_log_residual=float(np.sqrt(np.mean((np.log(law(c)) - np.log(l)) ** 2))),
        flops_range=[float(c.min()), float(c.max())],
        frontier=frontier(points) if len({p["size"] for p in points}) > 1 else [],
        band=band,
    ), refits


def matched_flops(fits: dict[str, tuple[FamilyFit, list[PowerLaw]]], at: float | None = None,
                  level: float = 0.95) -> dict:
    """Each family's fitted loss at one compute budget, with its bootstrap CI.

    The budget is `at`, else the geometric middle of the compute range every family covers (so each value is an
    interpolation); when the ranges do not overlap it is the middle of all of them and some values extrapolate.
    """
    lows = [f.flops_range[0] for f, _ in fits.values()]
    highs = [f.flops_range[1] for f, _ in fits.values()]
    if at is not None:
        flops, how = float(at), "given"
    elif max(lows) <= min(highs):
        flops, how = math.sqrt(max(lows) * min(highs)), "middle of the common compute range"
    else:
        flops, how = math.sqrt(min(lows) * max(highs)), "no common range: middle of all (some extrapolate)"
    families = {}
    for name, (fit, refits) in fits.items():
        values = [float(f(flops)) for f in refits]
        families[name] = {"loss": float(fit.law(flops)), "ci": _interval(values, level) if values else None,
                          "interpolated": fit.flops_range[0] <= flops <= fit.flops_range[1]}
    return {"flops": flops, "chosen": how, "families": families}


def fit_rows(rows, form: str = "power", n_boot: int = 1000, seed: int = 0, at: float | None = None,
             level: float = 0.95) -> dict:
    """fits.json content from collected rows: per family fits on bits per base, and the matched comparison."""
    by_family: dict[str, list[dict]] = {}
    for r in rows:
        by_family.setdefault(r.family, []).append({"run_id": r.run_id, "size": r.size, "params": r.params,
                                                   "flops": r.flops, "loss": r.bits_per_base})
    fits, skipped = {}, {}
    for family, points in sorted(by_family.items()):
        if len({p["flops"] for p in points}) < _MIN_DISTINCT[form]:
            skipped[family] = f"{len(points)} runs: too few distinct compute values for the {form} form"
            continue
        fits[family] = fit_family(family, points, form, n_boot, seed, level)
    if not fits:
        raise DataError("no family has enough runs to fit (" + "; ".join(f"{k}: {v}" for k, v in skipped.items())
                        + ")")
    return {
        "target": "bits per base of the MLM training loss (mean of the last k steps; see docs/scaling.md)",
        "form": form, "formula": "L(C) = a * C^(-b)" + (" + E" if form == "offset" else ""),
        "compute": "training FLOPs = recipe flops_per_token x tokens seen",
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": level},
        "families": {name: asdict(fit) for name, (fit, _) in fits.items()},
        "not_fitted": skipped,
        "matched_flops": matched_flops(fits, at, level),
    }
