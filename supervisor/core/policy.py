"""The supervision decision, pure: (state, event) → (state, actions). No I/O, no clock, no randomness.

Order as OTP's ``supervisor.erl``: restart type → intensity → strategy.

- permanent children are always restarted; transient ones only after an
  abnormal exit; temporary ones never (they are removed when they exit, and,
  as in OTP, a temporary child stopped as a sibling victim is removed too);
- every restart adds ``now`` to the history; more than ``max_restarts``
  restarts within ``max_seconds`` (OTP keeps entries with ``now - t <= period``)
  → :class:`Escalate`, and the state is failed for good;
- one_for_one restarts the child; one_for_all every child; rest_for_one the
  child and the children started after it;
- a restart asked for by an operator (:class:`RestartRequested`, ``actor.restart``; OTP's
  ``restart_child``) restarts that one child at once whatever its restart type, without
  backoff and without counting toward the intensity (nobody failed);
- backoff (OTP has none): the n-th consecutive failure of a child waits
  ``min(max, min * 2**(n-1)) * (1 + jitter * u)`` with ``u ∈ [-1, 1]`` passed in
  the event; a child that ran ``reset_after`` seconds (default 2 × max) before
  failing starts over at n = 1.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

import attrs

__all__ = ["Strategy", "RestartType", "Policy", "TreeState", "initial_state", "ChildStarted", "ChildExited",
           "ChildAdded", "ChildRemoved", "RestartRequested", "Restart", "Remove", "Stopped", "Escalate", "decide"]


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"

    def victims(self, order: tuple[str, ...], child: str) -> tuple[str, ...]:
        if self is Strategy.ONE_FOR_ONE:
            return (child,)
        if self is Strategy.ONE_FOR_ALL:
            return order
        return order[order.index(child):]


class RestartType(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"

    def should_restart(self, abnormal: bool) -> bool:
        return self is RestartType.PERMANENT or (self is RestartType.TRANSIENT and abnormal)


@attrs.frozen
class Policy:
    strategy: Strategy = Strategy.ONE_FOR_ONE
    max_restarts: int = 3
    max_seconds: float = 5.0
    backoff_min: float = 0.01
    backoff_max: float = 5.0
    jitter: float = 0.2
    reset_after: float | None = None

    @property
    def effective_reset(self) -> float:
        return self.reset_after if self.reset_after is not None else 2 * self.backoff_max

    def delay(self, failures: int, u: float) -> float:
        base = min(self.backoff_max, self.backoff_min * 2 ** max(0, failures - 1))
        return max(0.0, base * (1 + self.jitter * max(-1.0, min(1.0, u))))


@attrs.frozen
class TreeState:
    policy: Policy
    order: tuple[str, ...]
    restart_types: Mapping[str, RestartType]
    restarts: tuple[float, ...] = ()
    failures: Mapping[str, int] = attrs.field(factory=dict)
    started_at: Mapping[str, float] = attrs.field(factory=dict)
    failed: bool = False


def initial_state(policy: Policy, children: Sequence[tuple[str, RestartType]]) -> TreeState:
    return TreeState(policy, tuple(n for n, _ in children), dict(children))


@attrs.frozen
class ChildStarted:
    child: str
    at: float


@attrs.frozen
class ChildExited:
    child: str
    abnormal: bool
    at: float
    jitter_u: float = 0.0
    reason: str = ""


@attrs.frozen
class ChildAdded:
    child: str
    restart_type: RestartType = RestartType.PERMANENT


@attrs.frozen
class ChildRemoved:
    child: str


@attrs.frozen
class RestartRequested:
    """An operator asked for this child to be restarted; it is not running (any more)."""

    child: str
    at: float


@attrs.frozen
class Restart:
    """Stop ``stop_order`` (running siblings, reverse start order), wait ``delay``, start ``children``."""

    children: tuple[str, ...]
    stop_order: tuple[str, ...]
    delay: float


@attrs.frozen
class Remove:
    """The child is gone from the tree (temporary child exited or was stopped as a victim)."""

    child: str


@attrs.frozen
class Stopped:
    """The child stays stopped but keeps its place (transient child that exited normally)."""

    child: str


@attrs.frozen
class Escalate:
    reason: str


Action = Restart | Remove | Stopped | Escalate


def _without(s: TreeState, names: set[str]) -> TreeState:
    return attrs.evolve(
        s, order=tuple(n for n in s.order if n not in names),
        restart_types={k: v for k, v in s.restart_types.items() if k not in names},
        failures={k: v for k, v in s.failures.items() if k not in names},
        started_at={k: v for k, v in s.started_at.items() if k not in names})


def decide(s: TreeState, ev: object) -> tuple[TreeState, tuple[Action, ...]]:
    if s.failed:
        return s, ()
    if isinstance(ev, ChildStarted):
        if ev.child not in s.restart_types:
            return s, ()
        return attrs.evolve(s, started_at={**s.started_at, ev.child: ev.at}), ()
    if isinstance(ev, ChildAdded):
        if ev.child in s.restart_types:
            return s, ()
        return attrs.evolve(s, order=s.order + (ev.child,),
                            restart_types={**s.restart_types, ev.child: ev.restart_type}), ()
    if isinstance(ev, ChildRemoved):
        return _without(s, {ev.child}), ()
    if isinstance(ev, RestartRequested):
        if ev.child not in s.restart_types:
            return s, ()
        started = {k: v for k, v in s.started_at.items() if k != ev.child}
        return attrs.evolve(s, started_at=started), (Restart((ev.child,), (), 0.0),)
    if not isinstance(ev, ChildExited):
        raise TypeError(f"unknown event {ev!r}")
    child = ev.child
    rtype = s.restart_types.get(child)
    if rtype is None:
        return s, ()
    if not rtype.should_restart(ev.abnormal):
        if rtype is RestartType.TEMPORARY:
            return _without(s, {child}), (Remove(child),)
        started = {k: v for k, v in s.started_at.items() if k != child}
        return attrs.evolve(s, started_at=started), (Stopped(child),)
    p = s.policy
    window = tuple(t for t in s.restarts if ev.at - t <= p.max_seconds) + (ev.at,)
    s = attrs.evolve(s, restarts=window)
    if len(window) > p.max_restarts:
        return attrs.evolve(s, failed=True), (
            Escalate(f"more than {p.max_restarts} restarts in {p.max_seconds:g}s (last: {child}"
                     f"{': ' + ev.reason if ev.reason else ''})"),)
    victims = p.strategy.victims(s.order, child)
    temporaries = {v for v in victims if v != child and s.restart_types[v] is RestartType.TEMPORARY}
    ran = ev.at - s.started_at.get(child, ev.at)
    prev = s.failures.get(child, 0)
    n = 1 if (prev and ran >= p.effective_reset) else prev + 1
    stop_order = tuple(reversed([v for v in victims if v != child and v in s.started_at]))
    restart = tuple(v for v in victims if v not in temporaries)
    started = {k: v for k, v in s.started_at.items() if k not in victims}
    s = attrs.evolve(s, failures={**s.failures, child: n}, started_at=started)
    actions: list[Action] = [Restart(restart, stop_order, p.delay(n, ev.jitter_u))]
    if temporaries:
        s = _without(s, temporaries)
        actions += [Remove(t) for t in sorted(temporaries, key=victims.index)]
    return s, tuple(actions)
