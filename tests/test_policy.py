"""Tests for supervisor.policy: pure restart decisions driven by a FakeClock."""

from __future__ import annotations

import ast
import math
import random
import signal
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import supervisor.policy as policy_module
from supervisor.errors import ConfigurationError
from supervisor.policy import (
    RESTART_TYPES,
    Backoff,
    Decision,
    ExitInfo,
    FakeClock,
    GiveUp,
    Ignore,
    Restart,
    RestartHistory,
    RestartPolicy,
    decide,
)

QUICK = settings(database=None, max_examples=200, deadline=None)

CLEAN = ExitInfo(exit_code=0, signal=None)
FAILED = ExitInfo(exit_code=1, signal=None)
KILLED = ExitInfo(exit_code=None, signal=int(signal.SIGKILL))
UNKNOWN = ExitInfo(exit_code=None, signal=None)
REQUESTED_CLEAN = ExitInfo(exit_code=0, signal=None, requested=True)
REQUESTED_KILLED = ExitInfo(exit_code=None, signal=int(signal.SIGTERM), requested=True)

EXITS = {
    "clean": CLEAN,
    "nonzero": FAILED,
    "signal": KILLED,
    "unknown": UNKNOWN,
    "requested-clean": REQUESTED_CLEAN,
    "requested-signal": REQUESTED_KILLED,
}

# restart type -> exit kind -> expected decision class (with a fresh history)
TABLE: dict[str, dict[str, type[Decision]]] = {
    "permanent": {
        "clean": Restart,
        "nonzero": Restart,
        "signal": Restart,
        "unknown": Restart,
        "requested-clean": Ignore,
        "requested-signal": Ignore,
    },
    "transient": {
        "clean": Ignore,
        "nonzero": Restart,
        "signal": Restart,
        "unknown": Restart,
        "requested-clean": Ignore,
        "requested-signal": Ignore,
    },
    "temporary": {kind: Ignore for kind in EXITS},
}


def no_backoff(**kwargs: Any) -> RestartPolicy:
    return RestartPolicy(backoff=Backoff.none(), **kwargs)


def run_failures(
    policy: RestartPolicy, clock: FakeClock, times: list[float]
) -> tuple[list[Decision], RestartHistory]:
    """Drive exits at the given absolute times (never ready), recording each restart."""
    history = RestartHistory()
    rng = random.Random(0)
    decisions: list[Decision] = []
    for when in times:
        clock.advance(when - clock())
        decision = decide(policy, history, FAILED, clock(), rng)
        decisions.append(decision)
        if isinstance(decision, Restart):
            history = history.restarted(clock(), policy)
    return decisions, history


# -- restart types x exit kinds ----------------------------------------------------------
@pytest.mark.parametrize("restart", RESTART_TYPES)
@pytest.mark.parametrize("kind", list(EXITS))
def test_restart_type_by_exit_kind_table(restart: str, kind: str) -> None:
    """Each restart type restarts or ignores each kind of exit exactly as documented."""
    decision = decide(
        RestartPolicy(restart=restart), RestartHistory(), EXITS[kind], 0.0, random.Random(1)
    )
    assert type(decision) is TABLE[restart][kind]
    assert decision.reason


@pytest.mark.parametrize("restart", RESTART_TYPES)
def test_max_restarts_zero_gives_up_on_first_unrequested_exit(restart: str) -> None:
    """With max_restarts=0 every exit that would be restarted gives up at once (OTP MaxR=0)."""
    policy = RestartPolicy(restart=restart, max_restarts=0)
    for kind, info in EXITS.items():
        decision = decide(policy, RestartHistory(), info, 0.0, random.Random(0))
        if TABLE[restart][kind] is Restart:
            assert isinstance(decision, GiveUp)
            assert "max_restarts is 0" in decision.reason
        else:
            assert isinstance(decision, Ignore)


def test_ignored_exits_leave_history_unrecorded() -> None:
    """A requested exit is ignored even when the restart budget is exhausted."""
    policy = no_backoff(max_restarts=1)
    history = RestartHistory().restarted(0.0, policy)
    assert isinstance(decide(policy, history, FAILED, 1.0, random.Random(0)), GiveUp)
    assert isinstance(decide(policy, history, REQUESTED_KILLED, 1.0, random.Random(0)), Ignore)


# -- sliding window ----------------------------------------------------------------------
def test_sixth_restart_within_window_gives_up() -> None:
    """Five restarts at t=0..4 are allowed and the sixth exit at t=5 gives up (window 60s)."""
    clock = FakeClock()
    decisions, history = run_failures(no_backoff(), clock, [0, 1, 2, 3, 4, 5])
    assert all(isinstance(d, Restart) for d in decisions[:5])
    last = decisions[5]
    assert isinstance(last, GiveUp)
    assert "5 restarts within 60s" in last.reason
    assert history.restarts == (0.0, 1.0, 2.0, 3.0, 4.0)


def test_window_slides_open_again() -> None:
    """After a give-up, restarts are allowed again once old ones leave the window."""
    policy = no_backoff()
    _, history = run_failures(policy, FakeClock(), [0, 1, 2, 3, 4])
    rng = random.Random(0)
    assert isinstance(decide(policy, history, FAILED, 5.0, rng), GiveUp)
    assert isinstance(decide(policy, history, FAILED, 59.5, rng), GiveUp)
    assert isinstance(decide(policy, history, FAILED, 60.0, rng), Restart)  # (0, 60] holds 4
    assert isinstance(decide(policy, history, FAILED, 61.0, rng), Restart)
    assert history.in_window(61.0, policy) == 3
    assert history.in_window(100.0, policy) == 0


def test_window_is_half_open() -> None:
    """A restart exactly within_seconds ago no longer counts; one just inside does."""
    policy = no_backoff(max_restarts=1, within_seconds=10.0)
    history = RestartHistory().restarted(0.0, policy)
    assert isinstance(decide(policy, history, FAILED, 9.999, random.Random(0)), GiveUp)
    assert isinstance(decide(policy, history, FAILED, 10.0, random.Random(0)), Restart)


def test_spaced_restarts_never_give_up() -> None:
    """Restarts spaced wider than within_seconds / max_restarts never exhaust the window."""
    clock = FakeClock()
    decisions, history = run_failures(no_backoff(), clock, [13.0 * i for i in range(200)])
    assert all(isinstance(d, Restart) for d in decisions)
    assert len(history.restarts) <= 5


def test_infinite_window_counts_forever() -> None:
    """within_seconds=inf without a stable reset counts every restart ever made."""
    policy = no_backoff(max_restarts=3, within_seconds=math.inf)
    decisions, _ = run_failures(policy, FakeClock(), [0, 1000, 10**6, 10**7])
    assert [type(d) for d in decisions] == [Restart, Restart, Restart, GiveUp]
    assert "3 restarts within ever" in decisions[-1].reason


# -- backoff ------------------------------------------------------------------------------
def test_default_backoff_sequence_exact() -> None:
    """With initial=0 the first delay is 0, then step doubling up to the maximum."""
    backoff = Backoff(jitter=0.0)
    got = [backoff.base_delay(n) for n in range(12)]
    assert got == pytest.approx([0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30])
    rng = random.Random(5)
    assert [backoff.delay(n, rng) for n in range(12)] == got


def test_initial_backoff_sequence_exact() -> None:
    """With initial>0 the delay is min(maximum, initial * multiplier**attempt)."""
    backoff = Backoff(initial=1.0, maximum=10.0, multiplier=3.0, jitter=0.0, step=99.0)
    assert [backoff.base_delay(n) for n in range(5)] == [1.0, 3.0, 9.0, 10.0, 10.0]


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        (Backoff.none(), [0.0] * 6),
        (Backoff(initial=0.0, step=0.0), [0.0] * 6),
        (Backoff(maximum=0.0), [0.0] * 6),
        (Backoff(initial=2.0, multiplier=1.0), [2.0] * 6),
        (Backoff(initial=0.0, step=0.5, multiplier=1.0), [0.0] + [0.5] * 5),
    ],
)
def test_degenerate_backoffs(backoff: Backoff, expected: list[float]) -> None:
    """No-delay, zero-step, zero-maximum and constant backoffs give the documented delays."""
    assert [backoff.base_delay(n) for n in range(6)] == expected


def test_huge_attempt_saturates_without_overflow() -> None:
    """A huge attempt number returns the maximum instead of overflowing."""
    backoff = Backoff(initial=1.0, maximum=7.0, multiplier=10.0)
    assert backoff.base_delay(10**6) == 7.0
    assert backoff.base_delay(10**18) == 7.0
    assert Backoff().delay(10**9, random.Random(0)) <= 30.0 * 1.1


@QUICK
@given(
    seed=st.integers(0, 2**32),
    attempt=st.integers(0, 200),
    initial=st.floats(0.0, 5.0),
    maximum=st.floats(5.0, 120.0),
    multiplier=st.floats(1.0, 4.0),
    jitter=st.floats(0.0, 1.0),
)
def test_jittered_delay_within_bounds(  # noqa: PLR0917 - one argument per strategy
    seed: int, attempt: int, initial: float, maximum: float, multiplier: float, jitter: float
) -> None:
    """A jittered delay lies in [base, base*(1+jitter)] <= maximum*(1+jitter), reproducibly."""
    backoff = Backoff(initial=initial, maximum=maximum, multiplier=multiplier, jitter=jitter)
    base = backoff.base_delay(attempt)
    delay = backoff.delay(attempt, random.Random(seed))
    assert 0.0 <= base <= maximum
    assert base <= delay <= base * (1.0 + jitter) <= maximum * (1.0 + jitter)
    assert backoff.delay(attempt, random.Random(seed)) == delay


@QUICK
@given(
    initial=st.floats(0.0, 5.0),
    step=st.floats(0.0, 5.0),
    multiplier=st.floats(1.0, 4.0),
    attempt=st.integers(0, 100),
)
def test_base_delay_never_shrinks(
    initial: float, step: float, multiplier: float, attempt: int
) -> None:
    """The deterministic delay is non-decreasing in the attempt number."""
    backoff = Backoff(initial=initial, maximum=60.0, multiplier=multiplier, step=step)
    assert backoff.base_delay(attempt) <= backoff.base_delay(attempt + 1)


def test_jitter_spreads_over_its_range() -> None:
    """Over many seeds the jitter factor covers most of [1, 1 + jitter]."""
    backoff = Backoff(initial=10.0, maximum=10.0, jitter=0.5)
    delays = [backoff.delay(0, random.Random(seed)) for seed in range(500)]
    assert min(delays) < 10.5
    assert max(delays) > 14.5
    assert all(10.0 <= d <= 15.0 for d in delays)


def test_decide_uses_streak_attempts_and_backoff() -> None:
    """Consecutive quick failures restart with attempts 0,1,2,... and their backoff delays."""
    backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.0)
    policy = RestartPolicy(max_restarts=100, within_seconds=1000.0, backoff=backoff)
    decisions, history = run_failures(policy, FakeClock(), [float(t) for t in range(6)])
    restarts = [d for d in decisions if isinstance(d, Restart)]
    assert [d.attempt for d in restarts] == [0, 1, 2, 3, 4, 5]
    assert [d.delay for d in restarts] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert history.attempt == 6


# -- stable reset ------------------------------------------------------------------------
def test_streak_resets_after_stable_uptime() -> None:
    """A kernel ready for stable_after_seconds restarts at attempt 0; a shorter run does not."""
    policy = RestartPolicy(
        max_restarts=100, within_seconds=1000.0, backoff=Backoff(initial=1.0, jitter=0.0)
    )
    clock = FakeClock(100.0)
    rng = random.Random(0)
    history = RestartHistory()
    for _ in range(3):  # three quick failures: attempts 0, 1, 2
        history = history.restarted(clock.advance(1.0), policy)
    assert history.attempt == 3
    history = history.started(clock.advance(1.0))
    short = decide(policy, history, FAILED, clock() + 9.999, rng)
    assert isinstance(short, Restart)
    assert (short.attempt, short.delay) == (3, 8.0)
    clock.advance(10.0)
    stable = decide(policy, history, FAILED, clock(), rng)
    assert isinstance(stable, Restart)
    assert (stable.attempt, stable.delay) == (0, 1.0)
    history = history.restarted(clock(), policy)
    assert history.attempt == 1
    assert history.started_at is None
    assert len(history.restarts) == 4  # the window is not reset by default


def test_death_before_ready_never_resets_streak() -> None:
    """A kernel that never became ready keeps its streak, however long it ran."""
    policy = no_backoff(max_restarts=10)
    history = RestartHistory().restarted(0.0, policy).restarted(1.0, policy)
    decision = decide(policy, history, FAILED, 50.0, random.Random(0))
    assert isinstance(decision, Restart)
    assert decision.attempt == 2


def test_infinite_stable_time_never_resets() -> None:
    """stable_after_seconds=inf keeps the streak growing forever."""
    policy = no_backoff(max_restarts=10, stable_after_seconds=math.inf)
    history = RestartHistory().restarted(0.0, policy).started(1.0)
    decision = decide(policy, history, FAILED, 10.0**9, random.Random(0))
    assert isinstance(decision, Restart)
    assert decision.attempt == 1


def test_stable_resets_window_counts_consecutive_failures() -> None:
    """With stable_resets_window a stable run forgets the restarts counted so far."""
    policy = RestartPolicy.jupyter_client_compatible()
    clock = FakeClock()
    decisions, history = run_failures(policy, clock, [0, 1, 2, 3, 4, 5])
    assert [type(d) for d in decisions] == [Restart] * 5 + [GiveUp]
    history = history.started(clock.advance(1.0))
    decision = decide(policy, history, FAILED, clock.advance(10.0), random.Random(0))
    assert isinstance(decision, Restart)
    assert decision.attempt == 0
    history = history.restarted(clock(), policy)
    assert history.restarts == (clock(),)
    # without the flag the same history still gives up
    plain = RestartPolicy(
        max_restarts=5, within_seconds=math.inf, backoff=Backoff.none(), stable_after_seconds=10
    )
    _, history = run_failures(plain, FakeClock(), [0, 1, 2, 3, 4])
    history = history.started(5.0)
    assert isinstance(decide(plain, history, FAILED, 100.0, random.Random(0)), GiveUp)


# -- presets ----------------------------------------------------------------------------
def test_jupyter_client_compatible_mapping() -> None:
    """The jupyter_client preset is permanent, 5 consecutive restarts, 10s stable, no delay."""
    policy = RestartPolicy.jupyter_client_compatible()
    assert policy.restart == "permanent"
    assert policy.max_restarts == 5
    assert policy.within_seconds == math.inf
    assert policy.stable_after_seconds == 10.0
    assert policy.stable_resets_window is True
    assert policy.backoff == Backoff.none()
    assert all(policy.backoff.delay(n, random.Random(n)) == 0.0 for n in range(10))


def test_never_policy_ignores_everything() -> None:
    """RestartPolicy.never() is temporary and ignores every kind of exit."""
    policy = RestartPolicy.never()
    assert policy.restart == "temporary"
    for info in EXITS.values():
        assert isinstance(decide(policy, RestartHistory(), info, 0.0, random.Random(0)), Ignore)


def test_defaults_match_the_design() -> None:
    """The default policy and backoff carry the documented values."""
    policy = RestartPolicy()
    assert (policy.restart, policy.max_restarts, policy.within_seconds) == ("permanent", 5, 60.0)
    assert policy.stable_after_seconds == 10.0
    assert policy.stable_resets_window is False
    assert policy.backoff == Backoff(0.0, 30.0, 2.0, 0.1, 0.1)


# -- validation --------------------------------------------------------------------------
BAD_BACKOFF = [
    ({"initial": -1.0}, "Backoff.initial"),
    ({"initial": "1"}, "Backoff.initial"),
    ({"initial": True}, "Backoff.initial"),
    ({"initial": math.nan}, "Backoff.initial"),
    ({"initial": math.inf, "maximum": math.inf}, "Backoff.initial"),
    ({"maximum": -0.5}, "Backoff.maximum"),
    ({"maximum": math.inf}, "Backoff.maximum"),
    ({"maximum": None}, "Backoff.maximum"),
    ({"multiplier": 0.5}, "Backoff.multiplier"),
    ({"multiplier": False}, "Backoff.multiplier"),
    ({"jitter": -0.1}, "Backoff.jitter"),
    ({"jitter": 1.5}, "Backoff.jitter"),
    ({"step": -1}, "Backoff.step"),
    ({"step": 10**400}, "Backoff.step"),
    ({"initial": 5.0, "maximum": 1.0}, "Backoff.initial"),
]

BAD_POLICY = [
    ({"restart": "sometimes"}, "RestartPolicy.restart"),
    ({"restart": 1}, "RestartPolicy.restart"),
    ({"max_restarts": -1}, "RestartPolicy.max_restarts"),
    ({"max_restarts": True}, "RestartPolicy.max_restarts"),
    ({"max_restarts": 2.0}, "RestartPolicy.max_restarts"),
    ({"within_seconds": 0}, "RestartPolicy.within_seconds"),
    ({"within_seconds": -5.0}, "RestartPolicy.within_seconds"),
    ({"within_seconds": math.nan}, "RestartPolicy.within_seconds"),
    ({"within_seconds": -math.inf}, "RestartPolicy.within_seconds"),
    ({"within_seconds": True}, "RestartPolicy.within_seconds"),
    ({"backoff": {"initial": 1}}, "RestartPolicy.backoff"),
    ({"stable_after_seconds": -1.0}, "RestartPolicy.stable_after_seconds"),
    ({"stable_after_seconds": None}, "RestartPolicy.stable_after_seconds"),
    ({"stable_resets_window": 1}, "RestartPolicy.stable_resets_window"),
]

BAD_EXIT = [
    ({"exit_code": "0", "signal": None}, "ExitInfo.exit_code"),
    ({"exit_code": True, "signal": None}, "ExitInfo.exit_code"),
    ({"exit_code": None, "signal": 0}, "ExitInfo.signal"),
    ({"exit_code": None, "signal": 9.0}, "ExitInfo.signal"),
    ({"exit_code": 0, "signal": None, "requested": 1}, "ExitInfo.requested"),
]

BAD_HISTORY = [
    ({"restarts": [1.0]}, "RestartHistory.restarts"),
    ({"restarts": (2.0, 1.0)}, "RestartHistory.restarts"),
    ({"restarts": (math.nan,)}, "RestartHistory.restarts"),
    ({"restarts": ("1",)}, "RestartHistory.restarts"),
    ({"attempt": -1}, "RestartHistory.attempt"),
    ({"attempt": False}, "RestartHistory.attempt"),
    ({"started_at": math.inf}, "RestartHistory.started_at"),
    ({"started_at": "now"}, "RestartHistory.started_at"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [(Backoff, kw, f) for kw, f in BAD_BACKOFF]
    + [(RestartPolicy, kw, f) for kw, f in BAD_POLICY]
    + [(ExitInfo, kw, f) for kw, f in BAD_EXIT]
    + [(RestartHistory, kw, f) for kw, f in BAD_HISTORY],
)
def test_invalid_field_raises_configuration_error(
    cls: type[Any], kwargs: dict[str, Any], field: str
) -> None:
    """Each invalid constructor argument raises ConfigurationError naming the field."""
    with pytest.raises(ConfigurationError, match=field.replace(".", r"\.")):
        cls(**kwargs)


def test_accepted_edge_values() -> None:
    """Ints for float fields, infinite windows, zero stable time and negative times are valid."""
    RestartPolicy(within_seconds=math.inf, stable_after_seconds=0, max_restarts=0)
    Backoff(initial=1, maximum=1, multiplier=1, jitter=1, step=0)
    RestartHistory(restarts=(-5.0, -5.0, 3), attempt=7, started_at=-1.0)
    ExitInfo(exit_code=3, signal=int(signal.SIGKILL))


def test_call_arguments_are_validated() -> None:
    """decide, the history methods, base_delay and FakeClock reject bad arguments."""
    policy = RestartPolicy()
    rng = random.Random(0)
    with pytest.raises(ConfigurationError, match="policy"):
        decide(None, RestartHistory(), FAILED, 0.0, rng)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="history"):
        decide(policy, (), FAILED, 0.0, rng)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="exit"):
        decide(policy, RestartHistory(), 1, 0.0, rng)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="now"):
        decide(policy, RestartHistory(), FAILED, math.nan, rng)
    with pytest.raises(ConfigurationError, match="attempt"):
        Backoff().base_delay(-1)
    with pytest.raises(ConfigurationError, match="attempt"):
        Backoff().delay(True, rng)
    with pytest.raises(ConfigurationError, match="advance"):
        FakeClock().advance(-1.0)


def test_time_going_backwards_is_rejected() -> None:
    """A now earlier than a recorded restart or readiness is a ConfigurationError."""
    policy = RestartPolicy()
    history = RestartHistory().restarted(10.0, policy)
    with pytest.raises(ConfigurationError, match="monotonic"):
        decide(policy, history, FAILED, 9.0, random.Random(0))
    with pytest.raises(ConfigurationError, match="monotonic"):
        history.started(5.0)
    with pytest.raises(ConfigurationError, match="monotonic"):
        RestartHistory(started_at=3.0).restarted(2.0, policy)


# -- history pruning ---------------------------------------------------------------------
def test_history_memory_is_bounded() -> None:
    """Thousands of restarts keep at most max_restarts times, all inside the window."""
    policy = no_backoff(max_restarts=3, within_seconds=5.0)
    history = RestartHistory()
    now = 0.0
    for i in range(5000):
        now += 0.5 if i % 7 else 30.0
        history = history.restarted(now, policy)
        assert len(history.restarts) <= 3
        assert all(now - 5.0 < t <= now for t in history.restarts)
    assert history.attempt == 5000


def test_zero_max_restarts_keeps_nothing() -> None:
    """With max_restarts=0 a recorded restart is not even kept."""
    history = RestartHistory().restarted(1.0, RestartPolicy(max_restarts=0))
    assert history.restarts == ()
    assert history.attempt == 1


steps = st.lists(
    st.tuples(
        st.floats(0.0, 40.0),  # time from the restart decision to the next exit or readiness
        st.one_of(st.none(), st.floats(0.0, 40.0)),  # uptime once ready (None: died starting)
        st.booleans(),  # requested exit?
    ),
    min_size=1,
    max_size=40,
)


@QUICK
@given(
    steps=steps,
    max_restarts=st.integers(0, 6),
    within=st.sampled_from([1.0, 15.0, 60.0, math.inf]),
    stable=st.sampled_from([0.0, 5.0, 10.0, math.inf]),
    resets=st.booleans(),
)
def test_pruned_history_matches_unbounded_model(
    steps: list[tuple[float, float | None, bool]],
    max_restarts: int,
    within: float,
    stable: float,
    resets: bool,
) -> None:
    """Decisions on the pruned history equal those of a model that remembers every restart."""
    policy = RestartPolicy(
        max_restarts=max_restarts,
        within_seconds=within,
        stable_after_seconds=stable,
        stable_resets_window=resets,
        backoff=Backoff(initial=0.5, maximum=20.0, jitter=0.0),
    )
    clock = FakeClock(1000.0)
    history = RestartHistory()
    all_restarts: list[float] = []  # the model: never pruned
    counted_from = 0
    attempt = 0
    for wait, uptime, requested in steps:
        clock.advance(wait)
        ready_at: float | None = None
        if uptime is not None:
            ready_at = clock()
            history = history.started(ready_at)
            clock.advance(uptime)
        now = clock()
        info = ExitInfo(exit_code=1, signal=None, requested=requested)
        decision = decide(policy, history, info, now, random.Random(0))
        if requested:
            assert isinstance(decision, Ignore)
            history = RestartHistory(history.restarts, history.attempt, None)
            continue
        if ready_at is not None and now - ready_at >= stable:
            attempt = 0
            if resets:
                counted_from = len(all_restarts)
        count = sum(1 for t in all_restarts[counted_from:] if now - within < t <= now)
        if count >= max_restarts:
            assert isinstance(decision, GiveUp)
            return
        assert isinstance(decision, Restart)
        assert decision.attempt == attempt
        assert decision.delay == policy.backoff.base_delay(attempt)
        history = history.restarted(now, policy)
        all_restarts.append(now)
        attempt += 1
        assert history.attempt == attempt
        assert len(history.restarts) <= max_restarts


# -- values and helpers ---------------------------------------------------------------------
def test_exit_info_from_returncode_and_describe() -> None:
    """ExitInfo converts Popen return codes and describes codes, signals and unknown exits."""
    assert ExitInfo.from_returncode(0) == CLEAN
    assert ExitInfo.from_returncode(3).describe() == "exit code 3"
    killed = ExitInfo.from_returncode(-9, requested=True)
    assert (killed.exit_code, killed.signal, killed.requested) == (None, 9, True)
    assert killed.describe() == "signal SIGKILL"
    assert ExitInfo(None, 250).describe() == "signal 250"
    assert UNKNOWN.describe() == "unknown exit"
    assert [e.abnormal for e in (CLEAN, FAILED, KILLED, UNKNOWN)] == [False, True, True, True]
    assert ExitInfo(0, int(signal.SIGTERM)).abnormal


def test_fake_clock() -> None:
    """FakeClock starts where told, advances on demand and is usable as a Clock callable."""
    clock = FakeClock(5.0)
    assert clock() == clock.now() == 5.0
    assert clock.advance(2.5) == 7.5
    assert clock.advance(0) == 7.5
    assert clock.now() == 7.5
    with pytest.raises(ConfigurationError):
        FakeClock(math.nan)


def test_decisions_are_pure_values() -> None:
    """decide is deterministic for equal inputs and its values are immutable."""
    policy, history = RestartPolicy(), RestartHistory(restarts=(1.0,), attempt=3)
    first = decide(policy, history, KILLED, 2.0, random.Random(42))
    assert first == decide(policy, history, KILLED, 2.0, random.Random(42))
    assert history == RestartHistory(restarts=(1.0,), attempt=3)
    for value in (policy, history, first, KILLED, Backoff()):
        with pytest.raises(FrozenInstanceError):
            value.reason = "x"  # type: ignore[union-attr,misc]


def test_module_imports_only_errors_from_supervisor() -> None:
    """policy.py imports nothing from supervisor except errors, and no I/O or async modules."""
    tree = ast.parse(Path(policy_module.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert {m for m in imported if m.startswith("supervisor")} == {"supervisor.errors"}
    assert not imported & {"asyncio", "os", "io", "socket", "subprocess", "tornado", "zmq"}
