"""Pure planning: from (spec, observed children, previous status, now) to objects, status and events."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest

from shipyard.operator import naming, planning

NOW = datetime.datetime(2026, 11, 28, 12, 0, 0, tzinfo=datetime.UTC)
IMAGE = "registry.example/acme/digits-model"


def body(tag: str = "1.0.0", replicas: int = 2, status: dict[str, Any] | None = None, generation: int = 1,
         **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "shipyard.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "digits", "namespace": "ml", "uid": "uid-1", "generation": generation},
        "spec": {"image": f"{IMAGE}:{tag}", "model": {"path": "/models/digits"},
                 "serving": {"replicas": replicas}, **spec},
        "status": status or {},
    }


def view(version: str, replicas: int, ready: int | None = None, plan_for: dict[str, Any] | None = None,
         ) -> planning.DeploymentView:
    """An observed Deployment; with plan_for, its spec hash matches what the planner would apply."""
    ready = replicas if ready is None else ready
    spec_hash = ""
    if plan_for is not None:
        for obj in planning.plan_reconcile(plan_for, planning.Observed(), NOW).apply:
            if obj["kind"] == "Deployment" and obj["metadata"]["labels"][naming.LABEL_VERSION] == version:
                spec_hash = obj["metadata"]["annotations"][naming.ANNOTATION_SPEC_HASH]
    return planning.DeploymentView(
        name=naming.build_deployment_name("digits", version), version=version, image=f"{IMAGE}:{version}",
        replicas=replicas, ready_replicas=ready, available_replicas=ready, updated_replicas=replicas,
        generation=1, observed_generation=1, spec_hash=spec_hash,
    )


def deployments(plan: planning.Plan) -> dict[str, int]:
    """Replicas the plan sets per version: full applies of the target, scale-only changes of the others."""
    out = {o["metadata"]["labels"][naming.LABEL_VERSION]: o["spec"]["replicas"]
           for o in plan.apply if o["kind"] == "Deployment"}
    for name, replicas in plan.scale:
        out[name.removeprefix("digits-").replace("-", ".")] = replicas
    return out


def cond(plan: planning.Plan, type_: str) -> str:
    return next(c["status"] for c in plan.status["conditions"] if c["type"] == type_)


def service_hash() -> str:
    svc = planning.build_service(planning.build_meta(body()), 8080)
    return str(svc["metadata"]["annotations"][naming.ANNOTATION_SPEC_HASH])


STABLE_1 = {"stableVersion": "1.0.0", "phase": "Healthy",
            "history": [{"version": "1.0.0", "outcome": "Promoted", "image": f"{IMAGE}:1.0.0", "time": "t"}]}


@pytest.mark.parametrize(
    ("case", "md", "observed", "want_deployments", "want_phase", "want_stable", "want_candidate", "want_ready"),
    [
        pytest.param("first-apply", body(), {}, {"1.0.0": 2}, "Progressing", None, "1.0.0", "False",
                     id="first-apply-creates-the-version"),
        pytest.param("first-pods-not-ready", body(), {"1.0.0": (2, 1)}, {}, "Progressing", None, "1.0.0",
                     "False", id="first-version-waits-for-ready-pods"),
        pytest.param("first-ready", body(), {"1.0.0": (2, 2)}, {}, "Healthy", "1.0.0", None, "True",
                     id="first-version-promoted-when-available"),
        pytest.param("steady", body(status=STABLE_1), {"1.0.0": (2, 2)}, {}, "Healthy", "1.0.0", None, "True",
                     id="steady-state-plans-nothing"),
        pytest.param("new-tag", body("1.1.0", status=STABLE_1, generation=2), {"1.0.0": (2, 2)},
                     {"1.1.0": 2}, "Progressing", "1.0.0", "1.1.0", "False",
                     id="new-tag-starts-candidate-next-to-stable"),
        pytest.param("candidate-ready", body("1.1.0", status=STABLE_1, generation=2),
                     {"1.0.0": (2, 2), "1.1.0": (2, 2)}, {"1.0.0": 0}, "Progressing", "1.1.0", None, "False",
                     id="candidate-available-is-promoted-old-scaled-to-zero"),
        pytest.param("scale", body(replicas=3, status=STABLE_1, generation=2), {"1.0.0": (2, 2)},
                     {"1.0.0": 3}, "Progressing", "1.0.0", None, "False", id="replica-change-reapplies"),
        pytest.param("revert", body("0.9.0", status=STABLE_1, generation=3),
                     {"1.0.0": (2, 2), "0.9.0": (0, 0)}, {"0.9.0": 2}, "Progressing", "1.0.0", "0.9.0", "False",
                     id="revert-to-a-kept-version-scales-it-up"),
    ],
)
def test_transitions(case: str, md: dict[str, Any], observed: dict[str, tuple[int, int]],
                     want_deployments: dict[str, int], want_phase: str, want_stable: str | None,
                     want_candidate: str | None, want_ready: str) -> None:
    views = {}
    for version, (replicas, ready) in observed.items():
        # An observed Deployment matches what was last applied for it (same spec as the md, its replicas).
        applied_for = body(version, replicas=replicas, status=md["status"])
        views[version] = view(version, replicas, ready, plan_for=applied_for)
    plan = planning.plan_reconcile(md, planning.Observed(deployments=views, service_hash=service_hash()), NOW)
    assert deployments(plan) == want_deployments
    assert plan.status["phase"] == want_phase
    assert plan.status["stableVersion"] == want_stable
    assert plan.status["candidateVersion"] == want_candidate
    assert cond(plan, "Ready") == want_ready
    assert cond(plan, "Reconciling") == ("False" if want_ready == "True" else "True")
    assert cond(plan, "Stalled") == "False"
    assert plan.status["observedGeneration"] == md["metadata"]["generation"]


def test_promotion_records_history_and_an_event() -> None:
    md = body("1.1.0", status=STABLE_1, generation=2)
    views = {v: view(v, 2, 2, plan_for=body(v, status=STABLE_1)) for v in ("1.0.0", "1.1.0")}
    plan = planning.plan_reconcile(md, planning.Observed(views, service_hash()), NOW)
    assert [(h["version"], h["outcome"]) for h in plan.status["history"]] == [
        ("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    assert plan.status["history"][-1]["time"] == "2026-11-28T12:00:00Z"
    assert [e.reason for e in plan.events] == ["Promoted"]


def applied(plan: planning.Plan, views: dict[str, planning.DeploymentView]) -> dict[str, planning.DeploymentView]:
    """The observation after the plan's Deployments were applied and rolled out."""
    out = dict(views)
    for o in plan.apply:
        if o["kind"] == "Deployment":
            version, n = o["metadata"]["labels"][naming.LABEL_VERSION], o["spec"]["replicas"]
            out[version] = planning.DeploymentView(
                name=o["metadata"]["name"], version=version, image=f"{IMAGE}:{version}", replicas=n,
                ready_replicas=n, available_replicas=n, updated_replicas=n, generation=1, observed_generation=1,
                spec_hash=o["metadata"]["annotations"][naming.ANNOTATION_SPEC_HASH])
    for name, n in plan.scale:
        old = next(v for v in out.values() if v.name == name)
        out[old.version] = dataclasses.replace(old, replicas=n, ready_replicas=n, available_replicas=n,
                                               updated_replicas=n)
    return out


def test_a_settled_plan_is_idempotent() -> None:
    """Apply a plan, feed its status back: the loop settles, and then plans no writes, events or status change."""
    md = body("1.1.0", status=STABLE_1, generation=2)
    views: dict[str, planning.DeploymentView] = {"1.0.0": view("1.0.0", 2, 2, plan_for=body("1.0.0"))}
    status: dict[str, Any] = dict(STABLE_1)
    plans = []
    for i in range(4):
        plan = planning.plan_reconcile({**md, "status": status}, planning.Observed(views, service_hash()),
                                       NOW + datetime.timedelta(seconds=i))
        plans.append(plan)
        views, status = applied(plan, views), plan.status
    assert plans[-1].status["phase"] == "Healthy"
    assert plans[-1].apply == () and plans[-1].events == () and plans[-1].delete == ()
    assert not planning.assess_status_changed(plans[-2].status, plans[-1].status)
    assert {v: d.replicas for v, d in views.items()} == {"1.0.0": 0, "1.1.0": 2}


def test_revision_history_limit_keeps_the_newest_old_versions() -> None:
    history = [{"version": v, "outcome": "Superseded"} for v in ("0.7.0", "0.8.0", "0.9.0")]
    history.append({"version": "1.0.0", "outcome": "Promoted"})
    status = {"stableVersion": "1.0.0", "history": history}
    md = body(status=status, revisionHistoryLimit=1)
    views = {v: view(v, 0, 0) for v in ("0.7.0", "0.8.0", "0.9.0")}
    views["1.0.0"] = view("1.0.0", 2, 2)
    plan = planning.plan_reconcile(md, planning.Observed(views, service_hash()), NOW)
    assert sorted(name for _, _, name in plan.delete) == ["digits-0-7-0", "digits-0-8-0"]
    assert plan.scale == ()  # the kept version is already at zero: untouched


def test_deployment_carries_version_env_probes_owner_and_gpu_resources() -> None:
    md = body(serving={"replicas": 1, "resources": {"limits": {"nvidia.com/gpu": 1}}})
    (dep,) = [o for o in planning.plan_reconcile(md, planning.Observed(), NOW).apply if o["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SHIPYARD_MODEL_VERSION"] == "1.0.0"
    assert env["SHIPYARD_ARTIFACT_PATH"] == "/models/digits"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert dep["spec"]["selector"]["matchLabels"][naming.LABEL_VERSION] == "1.0.0"


def test_condition_transition_time_moves_only_on_flips() -> None:
    earlier = [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    same = planning.build_condition("Ready", True, "RolledOut", "", 3, earlier, NOW)
    flipped = planning.build_condition("Ready", False, "Progressing", "", 3, earlier, NOW)
    assert same["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert flipped["lastTransitionTime"] == "2026-11-28T12:00:00Z"


def test_kept_versions_are_only_scaled_never_re_rendered() -> None:
    """During a candidate rollout with changed serving settings, the stable keeps its pod template."""
    md = body("1.1.0", status=STABLE_1, generation=2, serving={"replicas": 2, "nodeSelector": {"pool": "b"}})
    stable = dataclasses.replace(view("1.0.0", 0, 0), spec_hash="whatever-was-applied-then")
    plan = planning.plan_reconcile(md, planning.Observed({"1.0.0": stable}, service_hash()), NOW)
    assert plan.scale == (("digits-1-0-0", 2),)
    (applied,) = [o for o in plan.apply if o["kind"] == "Deployment"]
    assert applied["metadata"]["name"] == "digits-1-1-0"
    assert applied["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "b"}
