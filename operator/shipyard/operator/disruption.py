"""PodDisruptionBudgets of the live versions (``spec.serving.disruptionBudget``). Pure, no I/O.

One PodDisruptionBudget per version Deployment with replicas (named as the Deployment, selecting that version's pods,
owned by the ModelDeployment), so that a node drain or a cluster autoscaler evicts at most ``maxUnavailable`` (or keeps
``minAvailable``) of each version's pods at once. A version scaled to 0 or deleted loses its budget. Default
(``disruptionBudget`` absent): ``maxUnavailable: 1`` when ``spec.serving.replicas`` > 1 (a budget over a single pod
would either allow its eviction anyway or block every drain); ``enabled: false`` makes none.

The planner calls ``plan_budgets`` once per pass with the final replicas per version; it returns the budgets to apply
(those whose ``shipyard.dev/spec-hash`` differs from what was observed) and the ones to delete.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Final

from pydantic import Field, WithJsonSchema

from shipyard.contract import schema
from shipyard.operator import naming

if TYPE_CHECKING:
    from shipyard.operator import objects
    from shipyard.operator import observed as observed_mod
    from shipyard.operator import spec as spec_mod

API_VERSION: Final = "policy/v1"
KIND: Final = "PodDisruptionBudget"
PERCENT_PATTERN: Final = r"^(100|[1-9]?[0-9])%$"

IntOrPercent = Annotated[
    Annotated[int, Field(ge=0, le=100000)] | Annotated[str, Field(max_length=4, pattern=PERCENT_PATTERN)],
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True,
                    "pattern": PERCENT_PATTERN, "maxLength": 4, "x-kubernetes-validations": [schema.Cel(
                        "type(self) == string || (self >= 0 && self <= 100000)",
                        "must be a number of pods (0..100000) or a percentage (0%..100%)").as_k8s()]}),
]


class DisruptionBudget(schema.ApiModel):
    """A PodDisruptionBudget per live version (evictions by node drains and autoscalers). Absent: maxUnavailable 1
    when spec.serving.replicas > 1. Set at most one of maxUnavailable and minAvailable."""

    __constraints__ = (schema.Constraint(
        schema.Cel("!has(self.maxUnavailable) || !has(self.minAvailable)",
                   "spec.serving.disruptionBudget sets maxUnavailable or minAvailable, not both",
                   field_path=".minAvailable", reason="FieldValueForbidden"),
        lambda d: "@minAvailable: set maxUnavailable or minAvailable, not both"
        if d.get("maxUnavailable") is not None and d.get("minAvailable") is not None else None),)

    enabled: bool = True
    """false: no PodDisruptionBudgets. Default true."""
    max_unavailable: IntOrPercent | None = None
    """Pods of a version that may be evicted at once: a number or a percentage of its pods. Default 1 (when neither
    is set and spec.serving.replicas > 1)."""
    min_available: IntOrPercent | None = None
    """Pods of a version kept through evictions: a number or a percentage of its pods."""


def build_budget(meta: objects.Meta, version: str, budget: DisruptionBudget) -> dict[str, Any]:
    """The PodDisruptionBudget of one version (named as its Deployment, selecting its pods)."""
    from shipyard.operator import objects  # objects -> spec -> this module: imported when first used
    labels = naming.build_version_labels(meta.name, version)
    bound: dict[str, int | str] = ({"minAvailable": budget.min_available} if budget.min_available is not None else
                                   {"maxUnavailable": budget.max_unavailable if budget.max_unavailable is not None
                                    else 1})
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": objects.build_object_meta(meta, naming.build_deployment_name(meta.name, version), labels),
        # AlwaysAllow: a pod that is not ready (crash-looping, never loaded) can be evicted; it serves nothing.
        "spec": {**bound, "selector": {"matchLabels": labels}, "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }
    obj["metadata"]["annotations"] = {naming.ANNOTATION_SPEC_HASH: objects.build_spec_hash(obj)}
    return obj


def build_budgets(meta: objects.Meta, md: spec_mod.ModelDeployment,
                  desired: Mapping[str, int]) -> list[dict[str, Any]]:
    """The budgets wanted for ``desired`` (replicas per version): one per version with replicas."""
    serving = md.spec.serving
    budget = serving.disruption_budget or DisruptionBudget()
    explicit = budget.max_unavailable is not None or budget.min_available is not None
    if not budget.enabled or (not explicit and serving.effective_replicas <= 1):
        return []
    return [build_budget(meta, version, budget) for version, replicas in sorted(desired.items()) if replicas > 0]


def plan_budgets(meta: objects.Meta, md: spec_mod.ModelDeployment, desired: Mapping[str, int],
                 observed: observed_mod.Observed) -> tuple[list[dict[str, Any]], list[tuple[str, str, str]]]:
    """(budgets to apply, budgets to delete) for the final replicas per version."""
    from shipyard.operator import objects  # objects -> spec -> this module: imported when first used
    wanted = build_budgets(meta, md, desired)
    names = {b["metadata"]["name"] for b in wanted}
    apply = [b for b in wanted if observed.budgets.get(b["metadata"]["name"]) != objects.spec_hash_of(b)]
    delete = [(API_VERSION, KIND, name) for name in sorted(observed.budgets) if name not in names]
    return apply, delete
