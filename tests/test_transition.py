"""The transition planner (pure): the typed worker actions from what devices hold to a target deployment.

Stage programs are stand-ins with a segment range and a sha256 (the planner reads nothing else);
the expected actions are written out by hand from the rules in partita/runtime/transition.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from partita.cluster import ClusterSpec
from partita.errors import DeployError
from partita.plan import predict
from partita.runtime.deployment import Deployment
from partita.runtime.transition import (
    Allow,
    AuthorizeSink,
    Drop,
    Holding,
    LinkSetting,
    Network,
    Renumber,
    Route,
    Ship,
    Sink,
    plan_transition,
)

PROFILE = {
    "model": "toy",
    "input_bytes": 1000,
    "segments": [
        {"name": n, "flops": 1e9, "param_bytes": 1e6, "act_bytes": 1e5, "out_bytes": 1000} for n in "abcdef"
    ],
}
CLUSTER = ClusterSpec.from_dict({
    "source": "client",
    "devices": [{"name": n, "flops_per_s": 1e10, "memory_bytes": 1e9} for n in ("a", "b", "c", "d")],
    "links": {"default": {"bandwidth_bytes_per_s": 1e8, "latency_s": 0.001}},
})


@dataclass(frozen=True)
class Program:
    index: int
    start: int
    end: int

    @property
    def sha256(self) -> str:
        return f"sha-{self.start}-{self.end}"


def deployment(stages: list[tuple[object, int, int]], epoch: int) -> Deployment:
    plan = predict(PROFILE, CLUSTER, stages)
    programs = tuple(Program(k, s.start, s.end) for k, s in enumerate(plan.stages))
    return Deployment(epoch, plan, programs, tuple(s.devices for s in plan.stages), "none", 4)


def network() -> Network:
    return Network(
        source="client",
        data={d: f"tcp://10.0.0.{i}:5000" for i, d in enumerate(CLUSTER.names)},
        public_keys={d: f"key-{d}" for d in CLUSTER.names},
        links=lambda a, b: LinkSetting(1e8, 0.001),
        planned=CLUSTER,
        sink=Sink("client", "tcp://10.0.0.9:6000", "key-client"),
    )


def holdings(target: Deployment) -> dict[str, Holding]:
    return {d: Holding(s.index, (s.plan.start, s.plan.end), s.program.sha256) for s in target.stages for d in s.devices}


def test_a_first_deploy_is_the_transition_from_nothing_and_ships_every_stage():
    target = deployment([("a", 0, 2), (("b", "c"), 2, 6)], epoch=1)
    transition = plan_transition({}, target, network(), live=["a", "b", "c", "d"])
    assert transition.shipped == (("a", 0), ("b", 1), ("c", 1))
    assert transition.renumbered == ()
    kinds = [type(a).__name__ for a in transition.actions]
    assert kinds == ["Ship"] * 3 + ["AuthorizeSink"] + ["Allow"] * 4 + ["Route"] * 4
    routes = {a.device: a.command for a in transition.actions if isinstance(a, Route)}
    assert [d.name for d in routes["a"].stages[0].next] == ["b", "c"]  # round-robin over the replicas
    assert [d.name for d in routes["b"].stages[0].next] == ["client"]
    # Stage 1 accepts stage 0's worker; stage 0 only the coordinator, which every worker accepts anyway.
    assert routes["b"].peers == ("key-a",) and routes["a"].peers == ()
    assert routes["d"].stages == () and routes["d"].epoch == 1  # an idle worker is routed to nothing
    [sink] = [a for a in transition.actions if isinstance(a, AuthorizeSink)]
    assert sink.keys == ("key-b", "key-c")
    allows = [a for a in transition.actions if isinstance(a, Allow)]
    assert all(a.peers == routes[a.device].peers for a in allows)


def test_switching_to_the_running_deployment_ships_nothing():
    running = deployment([("a", 0, 3), ("b", 3, 6)], epoch=1)
    again = Deployment(2, running.plan, running.programs, running.placement, "none", 4)
    transition = plan_transition(holdings(running), again, network(), live=["a", "b", "c", "d"])
    assert transition.shipped == () and transition.renumbered == ()
    assert not any(isinstance(a, Drop | Ship | Renumber) for a in transition.actions)
    assert transition.diff.keep == ("a", "b")


def test_a_merge_drops_the_idle_device_renumbers_the_shifted_ones_and_ships_the_merged_stage():
    running = deployment([("a", 0, 2), ("b", 2, 4), ("c", 4, 5), ("d", 5, 6)], epoch=1)
    merged = deployment([("a", 0, 4), ("c", 4, 5), ("d", 5, 6)], epoch=2)
    transition = plan_transition(holdings(running), merged, network(), live=["a", "b", "c", "d"])
    assert transition.actions[:4] == (
        Drop("b"),
        Renumber("c", 2, 1),
        Renumber("d", 3, 2),
        Ship("a", 0, merged.programs[0], merged.plan.stages[0].memory_bytes, None, (0, 4)),
    )
    assert transition.shipped == (("a", 0),)
    assert transition.renumbered == (("c", 1), ("d", 2))


def test_a_device_that_restarted_holds_nothing_and_is_shipped_its_stage_again():
    running = deployment([("a", 0, 3), ("b", 3, 6)], epoch=1)
    held = holdings(running)
    del held["b"]  # its worker restarted
    again = Deployment(2, running.plan, running.programs, running.placement, "none", 4)
    assert plan_transition(held, again, network(), live=["a", "b"]).shipped == (("b", 1),)


def test_a_target_on_a_device_without_a_live_worker_is_refused():
    target = deployment([("a", 0, 3), ("b", 3, 6)], epoch=1)
    with pytest.raises(DeployError, match=r"uses \['b'\], which have no live worker"):
        plan_transition({}, target, network(), live=["a", "c"])
