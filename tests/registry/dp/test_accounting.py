"""registry/dp/accounting.py: epsilon of composed DP-SGD events under RDP and PLD, and the
noise calibration, checked against Google's dp-accounting driven directly in the test."""

from __future__ import annotations

import math
from importlib import metadata

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from registry.dp import accounting
from registry.dp.accounting import AccountingError, DpEvent

# The DP-SGD paper's MNIST run (Abadi et al.): batch 256 of 60,000, sigma 1.1, 60 epochs.
MNIST = DpEvent(sampling_rate=256 / 60000, noise_multiplier=1.1, steps=14062)
DELTA = 1e-5


def library_epsilon(events: list[DpEvent], accountant: str, delta: float = DELTA) -> float:
    """What dp-accounting itself says, without going through the module under test."""
    acct = (
        rdp.RdpAccountant()
        if accountant == "rdp"
        else pld.PLDAccountant(value_discretization_interval=1e-4)
    )
    for e in events:
        step = dp_accounting.PoissonSampledDpEvent(
            e.sampling_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
        )
        acct.compose(dp_accounting.SelfComposedDpEvent(step, e.steps))
    return acct.get_epsilon(delta)


def test_the_mnist_run_costs_what_the_accountants_say():
    rdp_eps = accounting.epsilon([MNIST], delta=DELTA, accountant="rdp")
    pld_eps = accounting.epsilon([MNIST], delta=DELTA, accountant="pld")
    assert round(rdp_eps, 4) == 2.5966
    assert rdp_eps == pytest.approx(library_epsilon([MNIST], "rdp"), abs=1e-9)
    assert pld_eps == pytest.approx(2.382, abs=0.01)
    assert pld_eps == pytest.approx(library_epsilon([MNIST], "pld"), abs=1e-6)
    # PLD is the tighter of the two; swapping them would overstate or understate the spend.
    assert pld_eps < rdp_eps


def test_events_compose_to_less_than_their_sum_and_more_than_either():
    a = DpEvent(0.01, 1.0, 1000)
    b = DpEvent(0.02, 1.2, 500)
    ea, eb = (accounting.epsilon([e], delta=DELTA, accountant="rdp") for e in (a, b))
    both = accounting.epsilon([a, b], delta=DELTA, accountant="rdp")
    assert max(ea, eb) < both < ea + eb
    assert both == pytest.approx(library_epsilon([a, b], "rdp"), abs=1e-9)
    # Two runs of n steps are one run of 2n steps: composition, not a per-run figure.
    assert accounting.epsilon([a, a], delta=DELTA, accountant="rdp") == pytest.approx(
        accounting.epsilon([a.with_steps(2000)], delta=DELTA, accountant="rdp"), abs=1e-9
    )


def test_no_steps_cost_nothing_and_a_tighter_delta_costs_more():
    assert accounting.epsilon([], delta=DELTA, accountant="rdp") == 0.0
    assert accounting.epsilon([MNIST.with_steps(0)], delta=DELTA, accountant="pld") == 0.0
    loose = accounting.epsilon([MNIST], delta=1e-3, accountant="rdp")
    assert 0 < loose < accounting.epsilon([MNIST], delta=DELTA, accountant="rdp")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sampling_rate": 0.0},
        {"sampling_rate": 1.5},
        {"sampling_rate": math.nan},
        {"noise_multiplier": 0.0},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": math.inf},
        {"steps": -1},
        {"steps": 100_000_001},
        {"max_grad_norm": 0.0},
        {"max_grad_norm": math.nan},
    ],
)
def test_an_event_outside_its_domain_is_refused(kwargs):
    values = {"sampling_rate": 0.01, "noise_multiplier": 1.0, "steps": 10, **kwargs}
    with pytest.raises(AccountingError):
        DpEvent(**values)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_outside_zero_one_is_refused(delta):
    with pytest.raises(AccountingError, match="delta"):
        accounting.epsilon([MNIST], delta=delta, accountant="rdp")


def test_an_unknown_accountant_is_refused():
    with pytest.raises(AccountingError, match="accountant"):
        accounting.epsilon([MNIST], delta=DELTA, accountant="gdp")
    with pytest.raises(AccountingError, match="accountant"):
        accounting.noise_calibrate(
            sampling_rate=0.01, steps=10, target_epsilon=1.0, delta=DELTA, accountant="sum"
        )


@pytest.mark.parametrize(
    ("accountant", "sampling_rate", "steps", "target"),
    [("rdp", 256 / 60000, 14062, 3.0), ("pld", 64 / 1437, 220, 4.0)],
    ids=["rdp", "pld"],
)
def test_calibrated_noise_reaches_the_target_without_overshooting(
    accountant, sampling_rate, steps, target
):
    sigma = accounting.noise_calibrate(
        sampling_rate=sampling_rate,
        steps=steps,
        target_epsilon=target,
        delta=DELTA,
        accountant=accountant,
    )
    spent = library_epsilon([DpEvent(sampling_rate, sigma, steps)], accountant)
    assert spent <= target
    assert spent >= 0.99 * target  # not simply "a lot of noise"
    # Control: a little less noise overspends, so sigma is (about) the smallest that fits.
    assert library_epsilon([DpEvent(sampling_rate, sigma * 0.98, steps)], accountant) > target
    if accountant == "pld":
        # PLD is tighter, so the same target needs less noise than under RDP.
        assert sigma < accounting.noise_calibrate(
            sampling_rate=sampling_rate,
            steps=steps,
            target_epsilon=target,
            delta=DELTA,
            accountant="rdp",
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": math.nan}, "target_epsilon"),
        ({"steps": 0}, "steps"),
        # Even sigma 1000 cannot make a million full-batch steps cost 0.01.
        ({"sampling_rate": 1.0, "steps": 1_000_000, "target_epsilon": 0.01}, "larger epsilon"),
    ],
)
def test_an_impossible_calibration_is_refused(kwargs, match):
    values = {"sampling_rate": 0.01, "steps": 100, "target_epsilon": 1.0, **kwargs}
    with pytest.raises(AccountingError, match=match):
        accounting.noise_calibrate(**values, delta=DELTA, accountant="rdp")


def test_library_versions_name_the_installed_dp_accounting():
    assert accounting.library_versions() == {"dp-accounting": metadata.version("dp-accounting")}
