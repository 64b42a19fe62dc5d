"""Privacy accounting for the DP budget ledger, on Google's `dp-accounting`.

Every DP-SGD run the ledger knows is one Poisson-sampled Gaussian event (sampling rate q,
noise multiplier sigma, steps). A block's spent budget is the composition of its events under
the block's one accountant (RDP or PLD), never a sum of per-run epsilons: composing is
tighter than adding, and adding would be the wrong number for both accountants.

No Django here: the ledger service, the workers and the benchmarks all call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

import dp_accounting
from dp_accounting import pld, rdp
from scipy import optimize

ACCOUNTANTS = ("rdp", "pld")

# PLD's default discretisation (1e-4) keeps its estimate within ~0.01 of the true epsilon for
# the runs we see; a coarser one would be faster but reports a looser (larger) epsilon.
PLD_DISCRETIZATION = 1e-4
# Below this noise PLD's distribution is too large to compute here; no useful run needs less.
PLD_MIN_NOISE = 0.3


class AccountingError(ValueError):
    """An event or target the accountant cannot work with (the message says which value)."""


@dataclass(frozen=True)
class DpEvent:
    """One DP-SGD run: `steps` Poisson-sampled Gaussian steps (clipping norm kept for the
    record: it scales sensitivity and noise together, so it does not change epsilon)."""

    sampling_rate: float
    noise_multiplier: float
    steps: int
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 < self.sampling_rate <= 1.0) or not math.isfinite(self.sampling_rate):
            raise AccountingError("sampling_rate must be in (0, 1].")
        if not (self.noise_multiplier > 0.0) or not math.isfinite(self.noise_multiplier):
            raise AccountingError("noise_multiplier must be a positive number.")
        if self.steps < 0 or self.steps > 100_000_000:
            raise AccountingError("steps must be between 0 and 100,000,000.")
        if not (self.max_grad_norm > 0.0) or not math.isfinite(self.max_grad_norm):
            raise AccountingError("max_grad_norm must be a positive number.")

    def as_dict(self) -> dict[str, float | int]:
        return {
            "sampling_rate": self.sampling_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
            "max_grad_norm": self.max_grad_norm,
        }

    def with_steps(self, steps: int) -> DpEvent:
        return DpEvent(self.sampling_rate, self.noise_multiplier, steps, self.max_grad_norm)

    def _library_event(self) -> dp_accounting.DpEvent:
        step = dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)


def sampling_rate(n_train: int, batch_size: int) -> float:
    """The Poisson sampling rate Opacus trains with: 1 / len(DataLoader), that is
    1 / ceil(n_train / batch_size), *not* batch_size / n_train (make_private derives it from
    the wrapped loader's length). The ledger accounts with exactly what the run uses."""
    if n_train < 1 or batch_size < 1:
        raise AccountingError("n_train and batch_size must be at least 1.")
    return 1 / -(-n_train // batch_size)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """DP-SGD steps Opacus' Poisson loader takes per epoch: its sampler runs int(1 / q) times,
    ceil(n_train / batch_size) except where the float round trip loses one (93, 99, ...)."""
    return int(1 / sampling_rate(n_train, batch_size))


def accountant_check(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {list(ACCOUNTANTS)}.")
    return name


def _accountant(name: str) -> dp_accounting.PrivacyAccountant:
    if accountant_check(name) == "rdp":
        return rdp.RdpAccountant()
    return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def epsilon(events: Sequence[DpEvent], *, delta: float, accountant: str) -> float:
    """Epsilon at `delta` of all `events` composed under `accountant`; 0 for no steps."""
    if not (0.0 < delta < 1.0):
        raise AccountingError("delta must be in (0, 1).")
    steps = [event for event in events if event.steps > 0]
    if not steps:
        return 0.0
    if accountant_check(accountant) == "pld" and any(
        event.noise_multiplier < PLD_MIN_NOISE for event in steps
    ):
        # Refused, not computed: below it PLD needs gigabytes and minutes (any reader can ask
        # for a preview), and no useful run has that little noise.
        raise AccountingError(
            f"noise_multiplier must be at least {PLD_MIN_NOISE} on a PLD-accounted block."
        )
    return _epsilon_cached(tuple(steps), delta, accountant)


@lru_cache(maxsize=4096)
def _epsilon_cached(events: tuple[DpEvent, ...], delta: float, accountant: str) -> float:
    # Pure function of hashable inputs: the ledger recomposes the same committed events on
    # every budget read, and PLD takes ~0.3 s per long run.
    acct = _accountant(accountant)
    acct.compose(dp_accounting.ComposedDpEvent([event._library_event() for event in events]))
    value = float(acct.get_epsilon(delta))
    return value if math.isfinite(value) else math.inf


def noise_calibrate(
    *,
    sampling_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str,
    max_grad_norm: float = 1.0,
) -> float:
    """The smallest noise multiplier whose run of `steps` costs at most `target_epsilon`.

    dp-accounting's own bracketing search, so the guarantee is the accountant's figure for
    the returned sigma (it errs on the side of more noise).
    """
    if not (target_epsilon > 0.0) or not math.isfinite(target_epsilon):
        raise AccountingError("target_epsilon must be a positive number.")
    if steps < 1:
        raise AccountingError("steps must be at least 1.")

    def event(sigma: float) -> dp_accounting.DpEvent:
        return DpEvent(sampling_rate, sigma, steps, max_grad_norm)._library_event()

    lower, upper = 1e-2, 1e3
    if accountant_check(accountant) == "pld":
        # PLD's discretised distribution grows without bound as sigma shrinks (tens of GiB
        # near 0.01). RDP's sigma is always enough for PLD (its epsilon is an upper bound),
        # so bracket below it, stepping down only while PLD still fits the target.
        upper = noise_calibrate(
            sampling_rate=sampling_rate,
            steps=steps,
            target_epsilon=target_epsilon,
            delta=delta,
            accountant="rdp",
        )
        lower = upper
        while lower > PLD_MIN_NOISE:
            lower = max(PLD_MIN_NOISE, lower / 1.5)
            eps = epsilon(
                [DpEvent(sampling_rate, lower, steps, max_grad_norm)],
                delta=delta,
                accountant="pld",
            )
            if eps > target_epsilon:
                break
        else:
            return upper
    if accountant == "rdp":
        return _rdp_calibrate(sampling_rate, steps, target_epsilon, delta, max_grad_norm)
    try:
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
            tol=1e-3,
        )
    except (ValueError, RuntimeError) as exc:
        raise AccountingError(
            f"No noise multiplier up to {upper:g} reaches epsilon {target_epsilon} in "
            f"{steps} steps; ask for a larger epsilon, fewer epochs or a smaller batch."
        ) from exc
    return float(sigma)


# RDP orders of the calibration search: integers only. Their epsilon is never below the one
# of the accountant's default orders (a minimum over fewer orders), so a sigma found with them
# is always enough; they are 4x faster (no fractional-order series), which is most of the
# time a job's admission takes.
_SEARCH_ORDERS = [*range(2, 65), 80, 96, 128, 256, 512]


def _rdp_calibrate(
    sampling_rate: float, steps: int, target: float, delta: float, max_grad_norm: float
) -> float:
    def gap(log_sigma: float) -> float:
        acct = rdp.RdpAccountant(_SEARCH_ORDERS)
        event = DpEvent(sampling_rate, math.exp(log_sigma), steps, max_grad_norm)
        acct.compose(event._library_event())
        value = float(acct.get_epsilon(delta))
        return (value if math.isfinite(value) else 1e9) - target

    low, high = math.log(1e-2), math.log(1e3)
    if gap(high) > 0:
        raise AccountingError(
            f"No noise multiplier up to 1000 reaches epsilon {target} in {steps} steps; ask "
            "for a larger epsilon, fewer epochs or a smaller batch."
        )
    # Brent's method on log(sigma) (epsilon falls steeply then flatly in sigma), to a
    # relative precision of 1e-4; then one step up, so the root's upper side is returned.
    root = optimize.brentq(gap, low, high, xtol=1e-4)
    sigma = math.exp(root + 1e-4)
    while gap(math.log(sigma)) > 0:
        sigma *= 1.0001
    return sigma


def library_versions() -> dict[str, str]:
    """The accounting library's version, recorded with every ledger entry."""
    return {"dp-accounting": metadata.version("dp-accounting")}
