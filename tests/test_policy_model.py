"""The pure supervision policy, checked against a plain reference model of OTP's semantics."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from supervisor.core.policy import (ChildAdded, ChildExited, ChildRemoved, ChildStarted, Escalate, Policy, Remove,
                                    Restart, RestartRequested, RestartType, Stopped, Strategy, decide, initial_state)

NAMES = ["a", "b", "c", "d", "e"]


class OtpModel:
    """As little cleverness as possible: lists, a loop, OTP's rules in order."""

    def __init__(self, policy: Policy, children: list[tuple[str, RestartType]]):
        self.p = policy
        self.children = list(children)
        self.restarts: list[float] = []
        self.failed = False
        self.fails: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def kind(self, name):
        return dict(self.children)[name]

    def names(self):
        return [n for n, _ in self.children]

    def exit(self, name, abnormal, t, u):
        if self.failed or name not in self.names():
            return []
        k = self.kind(name)
        if k is RestartType.TEMPORARY:
            self.children = [c for c in self.children if c[0] != name]
            self.started.pop(name, None)
            self.fails.pop(name, None)
            return [Remove(name)]
        if k is RestartType.TRANSIENT and not abnormal:
            self.started.pop(name, None)
            return [Stopped(name)]
        self.restarts = [r for r in self.restarts if t - r <= self.p.max_seconds] + [t]
        if len(self.restarts) > self.p.max_restarts:
            self.failed = True
            return ["escalate"]
        names = self.names()
        if self.p.strategy is Strategy.ONE_FOR_ONE:
            victims = [name]
        elif self.p.strategy is Strategy.ONE_FOR_ALL:
            victims = names
        else:
            victims = names[names.index(name):]
        ran = t - self.started.get(name, t)
        n = self.fails.get(name, 0)
        n = 1 if n and ran >= self.p.effective_reset else n + 1
        self.fails[name] = n
        stop = [v for v in reversed(victims) if v != name and v in self.started]
        for v in victims:
            self.started.pop(v, None)
        temps = [v for v in victims if v != name and self.kind(v) is RestartType.TEMPORARY]
        self.children = [c for c in self.children if c[0] not in temps]
        for v in temps:
            self.fails.pop(v, None)
        delay = min(self.p.backoff_max, self.p.backoff_min * 2 ** (n - 1)) * (1 + self.p.jitter * u)
        return [Restart(tuple(v for v in victims if v not in temps), tuple(stop), delay)] + [Remove(v) for v in temps]


    def requested(self, name):
        """actor.restart (OTP's restart_child): that child alone, now, whatever its type."""
        if self.failed or name not in self.names():
            return []
        self.started.pop(name, None)
        return [Restart((name,), (), 0.0)]


class PolicyMachine(RuleBasedStateMachine):
    @initialize(strategy=st.sampled_from(Strategy), max_restarts=st.integers(0, 4),
                max_seconds=st.sampled_from([0.0, 1.0, 5.0]),
                kinds=st.lists(st.sampled_from(RestartType), min_size=1, max_size=4))
    def setup(self, strategy, max_restarts, max_seconds, kinds):
        self.policy = Policy(strategy=strategy, max_restarts=max_restarts, max_seconds=max_seconds,
                             backoff_min=0.01, backoff_max=1.0, jitter=0.2)
        children = list(zip(NAMES, kinds))
        self.state = initial_state(self.policy, children)
        self.model = OtpModel(self.policy, children)
        self.now = 0.0
        self.escalated = False
        for name, _ in children:
            self.start(name)

    def start(self, name):
        self.state, actions = decide(self.state, ChildStarted(name, self.now))
        assert actions == ()
        if name in self.model.names():
            self.model.started[name] = self.now

    @rule(dt=st.sampled_from([0.0, 0.001, 0.5, 3.0, 30.0]))
    def time_passes(self, dt):
        self.now += dt

    @rule(name=st.sampled_from(NAMES), abnormal=st.booleans(), u=st.floats(-1, 1))
    def child_exits(self, name, abnormal, u):
        self.state, actions = decide(self.state, ChildExited(name, abnormal, self.now, jitter_u=u))
        expected = self.model.exit(name, abnormal, self.now, u)
        if expected == ["escalate"]:
            assert len(actions) == 1 and isinstance(actions[0], Escalate)
            self.escalated = True
            return
        assert [type(a) for a in actions] == [type(e) for e in expected]
        for got, want in zip(actions, expected):
            if isinstance(want, Restart):
                assert got.children == want.children and got.stop_order == want.stop_order
                assert got.delay == pytest.approx(want.delay)
                assert 0 <= got.delay <= self.policy.backoff_max * (1 + self.policy.jitter)
            else:
                assert got == want
        for a in actions:
            if isinstance(a, Restart):
                for child in a.children:
                    self.start(child)

    @rule(name=st.sampled_from(NAMES))
    def restart_requested(self, name):
        window = self.state.restarts
        self.state, actions = decide(self.state, RestartRequested(name, self.now))
        assert list(actions) == self.model.requested(name)
        assert self.state.restarts == window  # an operator's restart is no failure: intensity untouched
        for a in actions:
            for child in a.children:
                self.start(child)

    @precondition(lambda self: not self.escalated)
    @rule(name=st.sampled_from(NAMES), kind=st.sampled_from(RestartType))
    def child_added(self, name, kind):
        self.state, _ = decide(self.state, ChildAdded(name, kind))
        if name not in self.model.names():
            self.model.children.append((name, kind))

    @precondition(lambda self: not self.escalated)
    @rule(name=st.sampled_from(NAMES))
    def child_removed(self, name):
        self.state, _ = decide(self.state, ChildRemoved(name))
        self.model.children = [c for c in self.model.children if c[0] != name]
        self.model.started.pop(name, None)
        self.model.fails.pop(name, None)

    @invariant()
    def same_children_and_fate(self):
        if hasattr(self, "model"):
            assert list(self.state.order) == self.model.names()
            assert self.state.failed == self.model.failed

    @invariant()
    def nothing_after_escalation(self):
        if getattr(self, "escalated", False):
            assert decide(self.state, ChildExited("a", True, self.now + 1))[1] == ()


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def _p(**kw):
    return Policy(**{"backoff_min": 0.01, "backoff_max": 1.0, "jitter": 0.0, **kw})


def _exit(state, name, at, abnormal=True):
    return decide(state, ChildExited(name, abnormal, at))


def test_intensity_boundary():
    s = initial_state(_p(max_restarts=2, max_seconds=5), [("a", RestartType.PERMANENT)])
    s, a1 = _exit(s, "a", 0.0)
    s, a2 = _exit(s, "a", 1.0)
    assert isinstance(a1[0], Restart) and isinstance(a2[0], Restart)
    s, a3 = _exit(s, "a", 2.0)
    assert isinstance(a3[0], Escalate) and s.failed


def test_restarts_older_than_the_window_are_forgotten():
    s = initial_state(_p(max_restarts=1, max_seconds=5), [("a", RestartType.PERMANENT)])
    s, _ = _exit(s, "a", 0.0)
    s, a = _exit(s, "a", 6.0)
    assert isinstance(a[0], Restart)


def test_max_restarts_zero_escalates_at_once():
    s = initial_state(_p(max_restarts=0), [("a", RestartType.PERMANENT)])
    assert isinstance(_exit(s, "a", 0.0)[1][0], Escalate)


@pytest.mark.parametrize("strategy,victims,stop", [
    (Strategy.ONE_FOR_ONE, ("b",), ()), (Strategy.ONE_FOR_ALL, ("a", "b", "c"), ("c", "a")),
    (Strategy.REST_FOR_ONE, ("b", "c"), ("c",))])
def test_strategies(strategy, victims, stop):
    kids = [(n, RestartType.PERMANENT) for n in "abc"]
    s = initial_state(_p(strategy=strategy), kids)
    for n in "abc":
        s, _ = decide(s, ChildStarted(n, 0.0))
    (r,) = _exit(s, "b", 1.0)[1]
    assert r.children == victims and r.stop_order == stop


def test_restart_types():
    kids = [("p", RestartType.PERMANENT), ("t", RestartType.TRANSIENT), ("x", RestartType.TEMPORARY)]
    s = initial_state(_p(), kids)
    assert isinstance(_exit(s, "p", 0, abnormal=False)[1][0], Restart)
    assert _exit(s, "t", 0, abnormal=False)[1] == (Stopped("t"),)
    assert isinstance(_exit(s, "t", 0, abnormal=True)[1][0], Restart)
    s2, a = _exit(s, "x", 0, abnormal=True)
    assert a == (Remove("x"),) and "x" not in s2.order


def test_temporary_sibling_is_removed_not_restarted_on_one_for_all():
    kids = [("a", RestartType.PERMANENT), ("x", RestartType.TEMPORARY)]
    s = initial_state(_p(strategy=Strategy.ONE_FOR_ALL), kids)
    s, a = _exit(s, "a", 0)
    assert a[0].children == ("a",) and a[1] == Remove("x") and s.order == ("a",)


def test_backoff_grows_caps_and_resets_after_stable_running():
    s = initial_state(_p(max_restarts=100, max_seconds=1, backoff_min=0.1, backoff_max=0.5),
                      [("a", RestartType.PERMANENT)])
    delays = []
    t = 0.0
    for _ in range(5):
        s, _ = decide(s, ChildStarted("a", t))
        t += 0.01
        s, (r,) = _exit(s, "a", t)
        delays.append(r.delay)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    s, _ = decide(s, ChildStarted("a", t))
    s, (r,) = _exit(s, "a", t + 1.0)  # ran 1.0 s ≥ reset (2 × max)
    assert r.delay == pytest.approx(0.1)


def test_a_requested_restart_restarts_a_temporary_or_stopped_child_without_touching_intensity():
    kids = [("t", RestartType.TRANSIENT), ("x", RestartType.TEMPORARY)]
    s = initial_state(_p(max_restarts=0, strategy=Strategy.ONE_FOR_ALL), kids)
    s, a = _exit(s, "t", 0, abnormal=False)
    assert a == (Stopped("t"),)
    for name in ("t", "x"):
        s, a = decide(s, RestartRequested(name, 1.0))
        assert a == (Restart((name,), (), 0.0),) and s.restarts == () and not s.failed
    assert decide(s, RestartRequested("gone", 1.0)) == (s, ())
