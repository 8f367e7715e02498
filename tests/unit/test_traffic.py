"""spec.rollout.traffic gatewayAPI: the pure rule decisions (traffic.py) and the planner's order of things with
routes, on the simulated cluster (tests/plansim.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shipyard.operator import traffic
from shipyard.operator.rollout import Reason
from tests.plansim import ANALYSIS, Sim, md

B = traffic.Backends(stable="digits", canary="digits-1-1-0", versions=frozenset({"digits-1-0-0", "digits-1-1-0"}),
                     port=8080)
OTHER_RULE = {"matches": [{"path": {"type": "PathPrefix", "value": "/other"}}],
              "backendRefs": [{"name": "someone-else", "port": 80}]}
MANAGED = {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
           "backendRefs": [{"name": "digits", "port": 8080}]}


def refs(rule: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [(r["name"], r.get("weight")) for r in rule["backendRefs"]]


@pytest.mark.parametrize(("weight", "expected"), [
    (0, [("digits", None)]),  # the rule as it was written: at rest a route is never written
    (5, [("digits", 95), ("digits-1-1-0", 5)]),
    (50, [("digits", 50), ("digits-1-1-0", 50)]),
    (100, [("digits-1-1-0", 100)]),
])
def test_managed_rule_gets_exact_weights(weight: int, expected: list[tuple[str, int]]) -> None:
    rules = traffic.build_rules([OTHER_RULE, MANAGED], B, weight, None)
    assert rules[0] == OTHER_RULE  # another rule stays as it is, in its place
    assert refs(rules[1]) == expected
    assert rules[1]["matches"] == MANAGED["matches"]
    assert traffic.read_canary_weight(rules, B) == weight


def test_preview_rule_adds_the_header_to_every_match_and_wins_by_precedence() -> None:
    managed = {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}},
                           {"path": {"type": "Exact", "value": "/health"}, "headers": [{"name": "x-a", "value": "1"}]}],
               "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a",
                                                                                               "value": "b"}]}}],
               "backendRefs": [{"name": "digits", "port": 9000}]}
    rules = traffic.build_rules([managed], B, 5, traffic.Preview("x-shipyard-version", "1.1.0"))
    preview = rules[1]
    assert preview["name"] == traffic.PREVIEW_RULE
    assert preview["backendRefs"] == [{"name": "digits-1-1-0", "port": 9000, "weight": 1}]
    assert [m["path"] for m in preview["matches"]] == [m["path"] for m in managed["matches"]]
    header = {"type": "Exact", "name": "x-shipyard-version", "value": "1.1.0"}
    assert preview["matches"][0]["headers"] == [header]
    assert preview["matches"][1]["headers"] == [{"name": "x-a", "value": "1"}, header]
    assert preview["filters"] == managed["filters"]
    # the preview rule is not a managed rule: rebuilding from the result gives the same rules, without it once gone
    assert traffic.assess_rules_equal(traffic.build_rules(rules, B, 5, traffic.Preview("x-shipyard-version",
                                                                                         "1.1.0")), rules)
    assert traffic.build_rules(rules, B, 0, None) == traffic.build_rules([managed], B, 0, None)


def test_grpc_preview_has_no_path() -> None:
    rule = {"backendRefs": [{"name": "digits", "port": 9000}]}
    preview = traffic.build_rules([rule], B, 10, traffic.Preview("x-shipyard-version", "1.1.0"),
                                  traffic.GRPC_ROUTE)[1]
    assert preview["matches"] == [{"headers": [{"type": "Exact", "name": "x-shipyard-version", "value": "1.1.0"}]}]


def test_rules_equal_after_api_defaults() -> None:
    written = traffic.build_rules([MANAGED], B, 5, traffic.Preview("x-shipyard-version", "1.1.0"))
    stored = copy.deepcopy(written)
    for rule in stored:  # what the API server adds
        for ref in rule["backendRefs"]:
            ref.setdefault("group", "")
            ref.setdefault("kind", "Service")
    assert traffic.assess_rules_equal(written, stored)
    stored[0]["backendRefs"][1]["weight"] = 30
    assert not traffic.assess_rules_equal(written, stored)


@pytest.mark.parametrize(("rules", "expected"), [
    ([MANAGED], 0),
    ([{"backendRefs": [{"name": "digits", "weight": 3}, {"name": "digits-1-1-0", "weight": 1}]}], 25),
    ([{"backendRefs": [{"name": "digits"}, {"name": "digits-1-1-0"}]}], 50),  # absent weight = 1
    ([OTHER_RULE], None),  # nothing managed
    ([{"backendRefs": [{"name": "digits", "weight": 90}, {"name": "digits-1-1-0", "weight": 10}]},
      {"backendRefs": [{"name": "digits", "weight": 50}, {"name": "digits-1-1-0", "weight": 50}]}], None),
])
def test_read_canary_weight(rules: list[dict[str, Any]], expected: int | None) -> None:
    assert traffic.read_canary_weight(rules, B) == expected


@pytest.mark.parametrize(("total", "canary_weight", "floor", "expected"), [
    (4, 5, 0, (1, 4)),  # a 5% step: one candidate pod, the stable keeps all four (it still takes 95%)
    (4, 50, 5, (2, 4)),  # the weight is still 5% in the route: the stable keeps what 95% needs
    (4, 50, 50, (2, 2)),
    (3, 5, 5, (1, 3)),
    (10, 25, 25, (3, 8)),
    (4, 100, 100, (4, 0)),
    (0, 50, 0, (0, 0)),
])
def test_gateway_replicas(total: int, canary_weight: int, floor: int, expected: tuple[int, int]) -> None:
    assert traffic.plan_gateway_replicas(total, canary_weight, floor) == expected


def route_body(rules: list[dict[str, Any]] | None = None, accepted: bool = True, gateway: str = "edge",
               parents: bool = True) -> dict[str, Any]:
    return {"apiVersion": traffic.API_VERSION, "kind": "HTTPRoute",
            "metadata": {"name": "digits", "namespace": "ml", "generation": 1, "resourceVersion": "10"},
            "spec": {"parentRefs": [{"name": gateway}] if parents else [], "hostnames": ["digits.example"],
                     "rules": copy.deepcopy(rules if rules is not None else [OTHER_RULE, MANAGED])},
            "status": {"parents": [{"parentRef": {"name": gateway}, "controllerName": "traefik.io/gateway-controller",
                                    "conditions": [{"type": "Accepted", "status": "True" if accepted else "False",
                                                    "reason": "Accepted" if accepted else "NotAllowedByListeners",
                                                    "observedGeneration": 1}]}] if parents else []}}


def programmed(ok: bool = True) -> traffic.GatewayView:
    return traffic.GatewayView(namespace="ml", name="edge", conditions=(
        {"type": "Programmed", "status": "True" if ok else "False", "reason": "Programmed" if ok else "Invalid",
         "message": "" if ok else "no listener"},))


def gateway_sim(steps: list[dict[str, Any]], replicas: int = 4, **kw: Any) -> Sim:
    sim = Sim(md(replicas=replicas, rollout={"steps": steps, "analysis": ANALYSIS,
                                             "traffic": {"gatewayAPI": {"httpRoute": "digits"}}}), **kw)
    sim.routes = {traffic.HTTP_ROUTE: route_body()}
    sim.gateways = {("ml", "edge"): programmed()}
    sim.settle()
    return sim


def upgrade(sim: Sim, tag: str = "1.1.0") -> None:
    sim.set_spec(image=f"registry.example/acme/digits-model:{tag}")


def test_a_route_at_rest_is_not_written() -> None:
    """The rule as a person or a GitOps tool wrote it (one backendRef, no weight, or any weight) is left alone while
    no candidate is weighted; after a rollout the rule goes back to the model's Service alone, without a weight."""
    for stable_ref in ({"name": "digits", "port": 8080}, {"name": "digits", "port": 8080, "weight": 100}):
        sim = Sim(md(replicas=4, rollout={"steps": [{"weight": 5, "pause": "30s"}], "analysis": ANALYSIS,
                                          "traffic": {"gatewayAPI": {"httpRoute": "digits"}}}))
        sim.routes = {traffic.HTTP_ROUTE: route_body([OTHER_RULE, {**MANAGED, "backendRefs": [stable_ref]}])}
        sim.gateways = {("ml", "edge"): programmed()}
        sim.settle()
        assert sim.route_writes == 0 and sim.status["traffic"]["programmed"] is True
        upgrade(sim)
        sim.settle()
        assert sim.route_writes > 0 and sim.status["stableVersion"] == "1.1.0"
        assert sim.routes[traffic.HTTP_ROUTE]["spec"]["rules"][1]["backendRefs"] == [{"name": "digits", "port": 8080}]


def test_exact_weights_step_by_step_and_promotion_order() -> None:
    sim = gateway_sim([{"weight": 5, "pause": "30s"}, {"weight": 50, "pause": "30s"}])
    assert sim.status["phase"] == "Healthy" and sim.route_weight() == 0
    assert sim.status["traffic"]["stableWeight"] == 100
    upgrade(sim)
    sim.run(lambda s: s.route_weight() == 5)
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 1}  # a 5% step: one candidate pod, the stable keeps four
    assert sim.selected_versions() == {"1.0.0"}  # the model's Service is the stable backend only
    sim.run(lambda s: s.route_weight() == 50)
    sim.run(lambda s: s.replicas().get("1.0.0") == 2)
    assert sim.replicas()["1.1.0"] == 2
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"
    assert sim.route_weight() == 0 and sim.selected_versions() == {"1.1.0"}
    # the weight never moved before the candidate's pods for it were Ready: a step's weight is set in a pass after
    # the candidate had the step's pods, and the stable shrank only after the weight was in the route
    for (_, weight, replicas), (_, _, before) in zip(sim.timeline[1:], sim.timeline, strict=False):
        if weight and replicas.get("1.1.0", 0) < (1 if weight <= 25 else 2):
            pytest.fail(f"weight {weight}% with {replicas}")
        if replicas.get("1.0.0", 0) < before.get("1.0.0", 0) and sim.status["stableVersion"] != "1.0.0":
            assert weight is not None
    rules = sim.routes[traffic.HTTP_ROUTE]["spec"]["rules"]
    assert rules[0] == OTHER_RULE and [r.get("name") for r in rules] == [None, None]  # the preview rule is gone
    assert sim.routes[traffic.HTTP_ROUTE]["spec"]["hostnames"] == ["digits.example"]


def test_preview_rule_reaches_the_candidate_from_ready() -> None:
    sim = gateway_sim([{"weight": 5, "manual": True}])
    upgrade(sim)
    sim.run(lambda s: s.status.get("phase") == "Paused")
    rules = sim.routes[traffic.HTTP_ROUTE]["spec"]["rules"]
    preview = [r for r in rules if r.get("name") == traffic.PREVIEW_RULE]
    assert len(preview) == 1 and preview[0]["backendRefs"][0]["name"] == "digits-1-1-0"
    assert sim.status["traffic"]["preview"] == {"header": "x-shipyard-version", "version": "1.1.0"}
    assert "digits-1-1-0" in sim.services  # the canary backend's Service exists


def test_rollback_takes_the_weight_to_zero_before_the_pods_go() -> None:
    bad = {"1.1.0"}
    sim = gateway_sim([{"weight": 25, "pause": "60s"}, {"weight": 50, "pause": "60s"}],
                      measure=lambda v, now: 0.5 if v in bad else 0.0)
    upgrade(sim)
    sim.run(lambda s: s.status.get("phase") == "RolledBack")
    sim.settle()
    assert sim.replicas().get("1.1.0", 0) == 0 and sim.route_weight() == 0
    drops = [(before, weight) for (_, _, now), (_, weight, before) in zip(sim.timeline[1:], sim.timeline,
                                                                          strict=False)
             if now.get("1.1.0", 0) < before.get("1.1.0", 0)]
    assert drops, sim.timeline
    assert all(weight == 0 for _, weight in drops), f"pods went while the route still sent traffic: {sim.timeline}"
    assert "digits-1-1-0" not in sim.services  # its Service goes once its pods did


def test_a_slow_gateway_controller_holds_scale_down() -> None:
    bad = {"1.1.0"}
    sim = gateway_sim([{"weight": 25, "pause": "60s"}], measure=lambda v, now: 0.5 if v in bad else 0.0)
    upgrade(sim)
    sim.run(lambda s: s.route_weight() == 25)
    sim.route_controller = False
    sim.run(lambda s: s.status.get("phase") == "RolledBack")
    for _ in range(5):
        sim.step()
    assert sim.route_weight() == 0 and sim.replicas()["1.1.0"] == 1  # written, not acted on: pods kept
    assert sim.status["traffic"]["programmed"] is False
    sim.route_controller = True
    sim.settle()
    assert sim.replicas().get("1.1.0", 0) == 0


def test_someone_elses_weights_are_restored_once_with_an_event() -> None:
    sim = gateway_sim([{"weight": 10, "manual": True}])
    upgrade(sim)
    sim.run(lambda s: s.status.get("phase") == "Paused")
    for _ in range(5):
        sim.step()
    writes = sim.route_writes
    body = sim.routes[traffic.HTTP_ROUTE]
    managed = next(r for r in body["spec"]["rules"] if r.get("name") != traffic.PREVIEW_RULE
                   and r["backendRefs"][0]["name"] == "digits")
    managed["backendRefs"] = [{"name": "digits", "port": 8080, "weight": 50},
                              {"name": "digits-1-1-0", "port": 8080, "weight": 50}]
    body["metadata"]["generation"] += 1
    body["metadata"]["resourceVersion"] = "999"
    sim.program_routes()
    for _ in range(10):
        sim.step()
    assert sim.route_weight() == 10
    assert sim.route_writes == writes + 1  # one write back, no flapping
    assert sim.reasons().count(Reason.TRAFFIC_RESTORED) == 1


@pytest.mark.parametrize(("setup", "reason", "words"), [
    (lambda s: s.routes.pop(traffic.HTTP_ROUTE), Reason.ROUTE_NOT_FOUND, "HTTPRoute 'digits'"),
    (lambda s: s.routes.__setitem__(traffic.HTTP_ROUTE, route_body(accepted=False)), Reason.ROUTE_NOT_ATTACHED,
     "NotAllowedByListeners"),
    (lambda s: s.routes.__setitem__(traffic.HTTP_ROUTE, route_body(parents=False)), Reason.ROUTE_NOT_ATTACHED,
     "names no Gateway"),
    (lambda s: s.routes.__setitem__(traffic.HTTP_ROUTE, route_body(rules=[OTHER_RULE])), Reason.ROUTE_NOT_ATTACHED,
     "no rule with a backendRef to Service 'digits'"),
    (lambda s: s.gateways.__setitem__(("ml", "edge"), programmed(False)), Reason.GATEWAY_NOT_PROGRAMMED,
     "Gateway 'edge' in namespace ml (a parent of HTTPRoute 'digits') is not programmed: Invalid no listener"),
    (lambda s: setattr(s, "gateway_api_served", False), Reason.GATEWAY_API_NOT_INSTALLED, "not installed"),
])
def test_route_faults_stall_the_rollout_and_leave_the_stable(setup: Any, reason: str, words: str) -> None:
    sim = gateway_sim([{"weight": 5, "pause": "30s"}])
    setup(sim)
    upgrade(sim)
    for _ in range(10):
        sim.step()
    assert sim.replicas() == {"1.0.0": 4}  # no candidate started, the stable untouched
    stalled = next(c for c in sim.status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == reason
    assert words in sim.status["message"] and "version 1.0.0 keeps serving" in sim.status["message"]
    assert sim.status["phase"] == "Paused"


def test_a_route_fixed_mid_rollout_resumes_without_moving_anything_meanwhile() -> None:
    sim = gateway_sim([{"weight": 5, "pause": "30s"}, {"weight": 50, "pause": "30s"}])
    upgrade(sim)
    sim.run(lambda s: s.route_weight() == 5)
    saved = sim.routes.pop(traffic.HTTP_ROUTE)
    for _ in range(20):
        sim.step()
    assert sim.replicas() == {"1.0.0": 4, "1.1.0": 1}
    assert sim.status["phase"] == "Paused"
    sim.routes[traffic.HTTP_ROUTE] = saved
    sim.settle()
    assert sim.status["phase"] == "Healthy" and sim.status["stableVersion"] == "1.1.0"


def test_replicas_traffic_is_unchanged() -> None:
    sim = Sim(md(replicas=4, rollout={"steps": [{"weight": 25, "pause": "30s"}], "analysis": ANALYSIS}))
    sim.settle()
    upgrade(sim)
    sim.run(lambda s: s.replicas().get("1.1.0") == 1)
    sim.run(lambda s: s.replicas().get("1.0.0") == 3)
    assert sim.selected_versions() == {"1.0.0", "1.1.0"}
    assert sim.status.get("traffic") is None


def test_a_shadow_step_keeps_the_candidate_out_of_the_route_then_weights_follow() -> None:
    from tests.unit.test_planning_shadow import AGREEMENT, OUTPUT

    body = md(replicas=4, rollout={"steps": [{"shadow": {"percent": 25, "minRequests": 10}}, {"weight": 5,
                                                                                            "pause": "30s"}],
                                   "analysis": AGREEMENT, "traffic": {"gatewayAPI": {"httpRoute": "digits"}}})
    body["spec"]["model"]["output"] = OUTPUT
    sim = Sim(body)
    sim.routes = {traffic.HTTP_ROUTE: route_body()}
    sim.gateways = {("ml", "edge"): programmed()}
    sim.settle()
    sim.figures = lambda version, now: {"compared": 1000.0, "dropped": 0.0, "timeouts": 0.0, "errors": 0.0,
                                        "rows": 1000.0}
    sim.measure = lambda version, now: 1.0
    upgrade(sim)
    sim.run(lambda s: s.status.get("shadow", {}).get("candidate") == "1.1.0")
    assert sim.route_weight() == 0 and sim.replicas() == {"1.0.0": 4, "1.1.0": 1}
    preview = [r for r in sim.routes[traffic.HTTP_ROUTE]["spec"]["rules"] if r.get("name") == traffic.PREVIEW_RULE]
    assert len(preview) == 1  # the preview header reaches the candidate during its shadow step
    sim.run(lambda s: s.route_weight() == 5)
    assert sim.status["currentStepIndex"] == 1 and sim.replicas() == {"1.0.0": 4, "1.1.0": 1}


def test_a_promotion_from_an_early_step_keeps_its_weight_until_every_pod_is_ready() -> None:
    """shipyard.dev/promote at the 5% step promotes at once: the candidate scales to every replica, and its weight
    stays 5% (not the last step's 50%) until they are Ready; the stable keeps what 95% needs meanwhile."""
    sim = gateway_sim([{"weight": 5, "manual": True}, {"weight": 50, "manual": True}])
    upgrade(sim)
    sim.run(lambda s: s.status.get("phase") == "Paused")
    assert sim.route_weight() == 5
    sim.frozen.add("1.1.0")  # the new pods take a while to be Ready
    sim.annotate("promote", "1.1.0")
    for _ in range(6):
        sim.step()
        assert sim.route_weight() == 5 and sim.replicas()["1.0.0"] == 4, (sim.route_weight(), sim.replicas())
    assert sim.replicas()["1.1.0"] == 4
    sim.frozen.discard("1.1.0")
    sim.deployments["1.1.0"] = sim._ready("1.1.0", 4)  # they are Ready now
    sim.settle()
    assert sim.status["stableVersion"] == "1.1.0" and sim.route_weight() == 0
