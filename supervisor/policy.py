"""Restart policies: a pure function from (policy, history, exit, now) to a decision.

Nothing here does I/O, reads a clock or awaits: the caller passes ``now`` (a
monotonic time in seconds) and a :class:`random.Random` for jitter, so every
decision can be replayed exactly in a test. Every class except
:class:`FakeClock` is an immutable value that any thread may share; a
:class:`FakeClock` belongs to whoever created it (it is not thread-safe).

How the supervisor uses it::

    history = RestartHistory()
    ...                                   # kernel became ready:
    history = history.started(clock())
    ...                                   # kernel process exited:
    now = clock()
    decision = decide(policy, history, ExitInfo(code, sig, requested), now, rng)
    if isinstance(decision, Restart):     # record it with the *same* now
        history = history.restarted(now, policy)
        ...                               # wait decision.delay, start again
    elif isinstance(decision, GiveUp):
        ...                               # raise RestartLimitExceeded(decision.reason)

Rules, in order: a requested exit is ignored; ``temporary`` ignores every exit
and ``transient`` ignores clean ones (exit code 0); if the kernel stayed up at
least ``stable_after_seconds`` the backoff streak restarts at attempt 0 (and,
with ``stable_resets_window``, the counted restarts are forgotten); if
``max_restarts`` restarts already happened in ``(now - within_seconds, now]``
the decision is :class:`GiveUp` (so ``max_restarts=0`` gives up on the first
exit that would have been restarted); otherwise :class:`Restart` after
``backoff.delay(attempt)``.

Mapping to other supervisors (our name <- theirs):

* Erlang/OTP: ``restart`` <- child ``permanent``/``transient``/``temporary``
  (same meaning; OTP's "normal" exit is our exit code 0);
  ``max_restarts``/``within_seconds`` <- intensity/period (give up when a
  restart would make more than MaxR in MaxT; MaxR=0 never restarts). OTP has
  no delay: ``Backoff.none()``.
* Pekko BackoffSupervisor: ``backoff.initial``/``maximum``/``jitter`` <-
  minBackoff/maxBackoff/randomFactor (same upward jitter, multiplier fixed at
  2); reset after the child stays up <- ``stable_after_seconds``;
  maxNrOfRetries <- ``max_restarts`` with ``within_seconds=inf`` and
  ``stable_resets_window=True``.
* systemd: ``Restart=always``/``on-failure``/``no`` <- permanent/transient/
  temporary; StartLimitBurst/StartLimitIntervalSec <- ``max_restarts``/
  ``within_seconds``; RestartSec <- ``initial``; RestartSteps=N with
  RestartMaxDelaySec=M <- ``maximum=M``, ``multiplier=(M/initial)**(1/N)``.
* supervisord: ``autorestart=true``/``unexpected``/``false`` <- permanent/
  transient/temporary (only 0 is an expected exit code here); startretries <-
  ``max_restarts`` with ``within_seconds=inf`` and
  ``stable_resets_window=True``; startsecs <- ``stable_after_seconds``.
* jupyter_client's KernelRestarter: see
  :meth:`RestartPolicy.jupyter_client_compatible`.
"""

from __future__ import annotations

import math
import random
import signal as _signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeAlias

from supervisor.errors import ConfigurationError

__all__ = [
    "RESTART_TYPES",
    "Backoff",
    "Clock",
    "Decision",
    "ExitInfo",
    "FakeClock",
    "GiveUp",
    "Ignore",
    "Restart",
    "RestartHistory",
    "RestartPolicy",
    "decide",
    "monotonic",
]

RESTART_TYPES = ("permanent", "transient", "temporary")

Clock: TypeAlias = Callable[[], float]
"""A clock: a callable returning monotonic seconds (``time.monotonic`` or a :class:`FakeClock`)."""

monotonic: Clock = time.monotonic
"""The real clock the supervisor injects by default (read by callers, never by :func:`decide`)."""


# -- validation helpers -----------------------------------------------------------
def _kind(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _number(
    where: str,
    value: object,
    *,
    minimum: float = 0.0,
    positive: bool = False,
    allow_inf: bool = False,
    maximum: float | None = None,
) -> float:
    """Check that ``value`` is a real number (not a bool) in range; name ``where`` if not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{where} must be a number, got {_kind(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ConfigurationError(f"{where} is too large: {value!r}") from None
    if math.isnan(number):
        raise ConfigurationError(f"{where} must not be NaN")
    if math.isinf(number) and not (allow_inf and number > 0):
        raise ConfigurationError(f"{where} must be finite, got {value!r}")
    if positive and number <= minimum:
        raise ConfigurationError(f"{where} must be > {minimum:g}, got {value!r}")
    if number < minimum:
        raise ConfigurationError(f"{where} must be >= {minimum:g}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ConfigurationError(f"{where} must be <= {maximum:g}, got {value!r}")
    return number


def _integer(where: str, value: object, *, minimum: int = 0) -> int:
    """Check that ``value`` is an int (not a bool) >= ``minimum``; name ``where`` if not."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{where} must be an int, got {_kind(value)}")
    if value < minimum:
        raise ConfigurationError(f"{where} must be >= {minimum}, got {value!r}")
    return value


def _time(where: str, value: object) -> float:
    """A monotonic time: any finite number (monotonic clocks may be negative)."""
    return _number(where, value, minimum=-math.inf)


def _seconds(value: float) -> str:
    return "ever" if math.isinf(value) else f"{value:g}s"


# -- backoff ------------------------------------------------------------------------
@dataclass(frozen=True)
class Backoff:
    """Exponential delay before restart number ``attempt`` (0-based) of a failure streak.

    Deterministic part (:meth:`base_delay`)::

        initial > 0:  min(maximum, initial * multiplier**attempt)
        initial == 0: 0 for attempt 0, then min(maximum, step * multiplier**(attempt - 1))

    so with the defaults the first restart is immediate and the next ones wait
    0.1, 0.2, 0.4, ... up to 30 s. ``step`` is used only when ``initial`` is 0.

    Jitter (:meth:`delay`): the base delay is multiplied by ``1 + jitter * u``
    with ``u`` uniform in ``[0, 1)`` (one ``rng.random()`` per call), so
    ``base <= delay <= base * (1 + jitter) <= maximum * (1 + jitter)``. Jitter
    only lengthens delays, as in Pekko, so restarts of many kernels spread out
    without ever coming sooner than the base delay.
    """

    initial: float = 0.0
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1
    step: float = 0.1

    def __post_init__(self) -> None:
        initial = _number("Backoff.initial", self.initial)
        maximum = _number("Backoff.maximum", self.maximum)
        _number("Backoff.multiplier", self.multiplier, minimum=1.0)
        _number("Backoff.jitter", self.jitter, maximum=1.0)
        _number("Backoff.step", self.step)
        if initial > maximum:
            raise ConfigurationError(
                f"Backoff.initial ({self.initial!r}) must be <= Backoff.maximum ({self.maximum!r})"
            )

    @classmethod
    def none(cls) -> Backoff:
        """No delay at all: every restart is immediate (OTP, jupyter_client)."""
        return cls(initial=0.0, maximum=0.0, jitter=0.0, step=0.0)

    def base_delay(self, attempt: int) -> float:
        """The delay before restart ``attempt`` (0-based) of a streak, without jitter."""
        _integer("attempt", attempt)
        if self.initial > 0:
            first, exponent = float(self.initial), attempt
        elif attempt == 0:
            return 0.0
        else:
            first, exponent = float(self.step), attempt - 1
        if first == 0 or self.maximum == 0:
            return 0.0
        try:
            growth = float(self.multiplier) ** exponent
        except OverflowError:
            return float(self.maximum)
        return min(float(self.maximum), first * growth)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """:meth:`base_delay` lengthened by a random factor in ``[1, 1 + jitter]``."""
        base = self.base_delay(attempt)
        return base * (1.0 + self.jitter * rng.random())


# -- policy ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a kernel that exited, how long to wait, and when to give up.

    * ``restart``: ``permanent`` restarts after any exit not asked for;
      ``transient`` only after abnormal ones (non-zero code, signal, unknown);
      ``temporary`` never.
    * ``max_restarts`` / ``within_seconds``: at most that many restarts in any
      sliding window of that length (``inf``: ever); one more gives up.
    * ``backoff``: the delay before each restart of a streak.
    * ``stable_after_seconds``: a kernel that stayed ready that long before
      exiting starts a new streak (attempt 0). ``inf``: never reset.
    * ``stable_resets_window``: if true, such a stable run also forgets the
      restarts counted so far, turning ``max_restarts`` into "consecutive
      unstable restarts" (jupyter_client, supervisord, Pekko).
    """

    restart: str = "permanent"
    max_restarts: int = 5
    within_seconds: float = 60.0
    backoff: Backoff = field(default_factory=Backoff)
    stable_after_seconds: float = 10.0
    stable_resets_window: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.restart, str) or self.restart not in RESTART_TYPES:
            raise ConfigurationError(
                f"RestartPolicy.restart must be one of {', '.join(RESTART_TYPES)}, "
                f"got {_kind(self.restart)}"
            )
        _integer("RestartPolicy.max_restarts", self.max_restarts)
        _number("RestartPolicy.within_seconds", self.within_seconds, positive=True, allow_inf=True)
        if not isinstance(self.backoff, Backoff):
            raise ConfigurationError(
                f"RestartPolicy.backoff must be a Backoff, got {_kind(self.backoff)}"
            )
        _number("RestartPolicy.stable_after_seconds", self.stable_after_seconds, allow_inf=True)
        if not isinstance(self.stable_resets_window, bool):
            raise ConfigurationError(
                f"RestartPolicy.stable_resets_window must be a bool, "
                f"got {_kind(self.stable_resets_window)}"
            )

    @classmethod
    def jupyter_client_compatible(cls) -> RestartPolicy:
        """The policy closest to jupyter_client's ``KernelRestarter`` defaults.

        ``restart_limit=5`` consecutive restarts -> ``max_restarts=5`` with
        ``within_seconds=inf`` and ``stable_resets_window=True``; the count
        resets once the kernel has lived ``stable_start_time=10`` s ->
        ``stable_after_seconds=10``; it restarts after any death outside a
        shutdown -> ``permanent``; it has no backoff -> :meth:`Backoff.none`.
        Differences: jupyter_client notices deaths by polling (every 3 s) and
        measures stability from the death, we from readiness.
        """
        return cls(
            restart="permanent",
            max_restarts=5,
            within_seconds=math.inf,
            backoff=Backoff.none(),
            stable_after_seconds=10.0,
            stable_resets_window=True,
        )

    @classmethod
    def never(cls) -> RestartPolicy:
        """Never restart (``temporary``): every exit is reported and left alone."""
        return cls(restart="temporary")


# -- exits and history --------------------------------------------------------------------
@dataclass(frozen=True)
class ExitInfo:
    """How a kernel process ended, and whether we asked it to.

    ``exit_code`` is set for a normal exit, ``signal`` when a signal killed it
    (it wins if both are set); both ``None`` means the cause is unknown. Only
    ``exit_code == 0`` is a clean exit.
    """

    exit_code: int | None
    signal: int | None
    requested: bool = False

    def __post_init__(self) -> None:
        if self.exit_code is not None:
            _integer("ExitInfo.exit_code", self.exit_code, minimum=-(2**63))
        if self.signal is not None:
            _integer("ExitInfo.signal", self.signal, minimum=1)
        if not isinstance(self.requested, bool):
            raise ConfigurationError(
                f"ExitInfo.requested must be a bool, got {_kind(self.requested)}"
            )

    @classmethod
    def from_returncode(cls, returncode: int, *, requested: bool = False) -> ExitInfo:
        """Build from :attr:`subprocess.Popen.returncode` (negative: killed by that signal)."""
        _integer("returncode", returncode, minimum=-(2**63))
        if returncode < 0:
            return cls(exit_code=None, signal=-returncode, requested=requested)
        return cls(exit_code=returncode, signal=None, requested=requested)

    @property
    def abnormal(self) -> bool:
        """True unless the process exited with code 0 (and no signal)."""
        return self.signal is not None or self.exit_code != 0

    def describe(self) -> str:
        """``exit code 3``, ``signal SIGKILL`` or ``unknown exit``."""
        if self.signal is not None:
            try:
                return f"signal {_signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        if self.exit_code is not None:
            return f"exit code {self.exit_code}"
        return "unknown exit"


@dataclass(frozen=True)
class RestartHistory:
    """What :func:`decide` needs to remember between exits; replace it, never mutate.

    ``restarts`` holds the monotonic times of the restarts that can still
    count: :meth:`restarted` keeps only those inside the window and at most
    ``max_restarts`` of them, so its size is bounded by the policy.
    """

    restarts: tuple[float, ...] = ()
    attempt: int = 0
    started_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.restarts, tuple):
            raise ConfigurationError(
                f"RestartHistory.restarts must be a tuple, got {_kind(self.restarts)}"
            )
        previous = -math.inf
        for when in self.restarts:
            current = _time("RestartHistory.restarts[...]", when)
            if current < previous:
                raise ConfigurationError("RestartHistory.restarts must be in increasing order")
            previous = current
        _integer("RestartHistory.attempt", self.attempt)
        if self.started_at is not None:
            _time("RestartHistory.started_at", self.started_at)

    def _check_now(self, now: object) -> float:
        moment = _time("now", now)
        latest = max([*self.restarts, -math.inf if self.started_at is None else self.started_at])
        if moment < latest:
            raise ConfigurationError(
                f"now ({moment!r}) is before a time already recorded ({latest!r}): "
                "use one monotonic clock"
            )
        return moment

    def uptime(self, now: float) -> float | None:
        """Seconds the current incarnation has been ready at ``now``, None if it never was."""
        moment = self._check_now(now)
        return None if self.started_at is None else moment - self.started_at

    def stable(self, now: float, policy: RestartPolicy) -> bool:
        """Whether the current incarnation stayed ready long enough to start a new streak."""
        uptime = self.uptime(now)
        return uptime is not None and uptime >= policy.stable_after_seconds

    def effective(self, now: float, policy: RestartPolicy) -> RestartHistory:
        """This history as :func:`decide` sees it at ``now``: streak (and maybe window) reset."""
        if not self.stable(now, policy):
            return self
        restarts = () if policy.stable_resets_window else self.restarts
        return replace(self, restarts=restarts, attempt=0)

    def in_window(self, now: float, policy: RestartPolicy) -> int:
        """How many recorded restarts fall in ``(now - within_seconds, now]``."""
        moment = self._check_now(now)
        since = moment - policy.within_seconds
        return sum(1 for when in self.restarts if since < when <= moment)

    def started(self, now: float) -> RestartHistory:
        """Record that the current incarnation became ready at ``now``."""
        return replace(self, started_at=self._check_now(now))

    def restarted(self, now: float, policy: RestartPolicy) -> RestartHistory:
        """Record a restart decided at ``now`` (pass the ``now`` given to :func:`decide`).

        Applies the stable reset, appends ``now``, drops restarts outside the
        window and all but the newest ``max_restarts``, advances the streak
        and forgets ``started_at`` (the next incarnation is not ready yet).
        """
        moment = self._check_now(now)
        base = self.effective(moment, policy)
        since = moment - policy.within_seconds
        kept = [when for when in (*base.restarts, moment) if when > since]
        keep = policy.max_restarts
        trimmed = tuple(kept[-keep:]) if keep else ()
        return RestartHistory(restarts=trimmed, attempt=base.attempt + 1, started_at=None)


# -- decisions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Restart:
    """Start the kernel again after ``delay`` seconds; ``attempt`` is 0-based in the streak."""

    delay: float
    attempt: int
    reason: str


@dataclass(frozen=True)
class GiveUp:
    """The restart intensity is exhausted: stop and escalate (``RestartLimitExceeded``)."""

    reason: str


@dataclass(frozen=True)
class Ignore:
    """Leave the kernel stopped and count nothing: requested, or not a restartable exit."""

    reason: str


Decision: TypeAlias = Restart | GiveUp | Ignore


def decide(
    policy: RestartPolicy,
    history: RestartHistory,
    exit: ExitInfo,
    now: float,
    rng: random.Random,
) -> Decision:
    """Decide what to do about ``exit`` at monotonic time ``now``; see the module docstring."""
    if not isinstance(policy, RestartPolicy):
        raise ConfigurationError(f"policy must be a RestartPolicy, got {_kind(policy)}")
    if not isinstance(history, RestartHistory):
        raise ConfigurationError(f"history must be a RestartHistory, got {_kind(history)}")
    if not isinstance(exit, ExitInfo):
        raise ConfigurationError(f"exit must be an ExitInfo, got {_kind(exit)}")
    moment = history._check_now(now)
    what = exit.describe()
    if exit.requested:
        return Ignore(f"{what}: the exit was requested")
    if policy.restart == "temporary":
        return Ignore(f"{what}: restart policy is temporary")
    if policy.restart == "transient" and not exit.abnormal:
        return Ignore(f"{what}: a clean exit and the restart policy is transient")
    current = history.effective(moment, policy)
    count = current.in_window(moment, policy)
    if count >= policy.max_restarts:
        if policy.max_restarts == 0:
            return GiveUp(f"{what}: max_restarts is 0, no restart allowed")
        return GiveUp(
            f"{what}: {count} restarts within {_seconds(policy.within_seconds)} "
            f"already (max_restarts={policy.max_restarts})"
        )
    delay = policy.backoff.delay(current.attempt, rng)
    return Restart(
        delay=delay,
        attempt=current.attempt,
        reason=(
            f"{what}: restart {count + 1} of {policy.max_restarts} allowed within "
            f"{_seconds(policy.within_seconds)}, streak attempt {current.attempt}, "
            f"after {delay:.3g}s"
        ),
    )


# -- clocks ------------------------------------------------------------------------------
class FakeClock:
    """A hand-driven :data:`Clock` for tests: ``clock()`` or ``clock.now()`` reads it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = _time("FakeClock start", start)

    def now(self) -> float:
        """The current fake time in seconds."""
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (>= 0) and return the new time."""
        self._now += _number("FakeClock.advance seconds", seconds)
        return self._now
