"""The ``job`` metric provider: a Kubernetes Job run against the candidate; its exit code is the verdict. Pure.

Spec fragment ``metrics[].job {template, activeDeadlineSeconds, backoffLimit}``: a pod template (as in a Job). Each
measurement is one Job, created by the planner (``build_job``: never a write outside the plan) when the metric is
due and read back from the cache when it finishes (``build_sample``), so a measurement lasts as long as its Job runs
(at most ``activeDeadlineSeconds``) and the next one is due an ``interval`` after it finished.

Every container of the template gets, in its environment (``contract``): ``SHIPYARD_ENDPOINT`` (the base URL of the
candidate's own Service, ``http://<model>-<version>.<namespace>.svc:<port>``), ``SHIPYARD_REFERENCE_ENDPOINT`` (the
stable's, when there is one), ``SHIPYARD_MODEL_NAME``, ``SHIPYARD_MODEL_VERSION``, ``SHIPYARD_STABLE_VERSION`` and
``SHIPYARD_METRIC_NAME``. ``shipyard-runtime evaluate`` is made for it: the compression gate's dataset scored
against the canary's real serving path.

Verdict (exit code of the Job's pod, ``contract.EXIT_*``): 0 = measured: the value at the end of the termination
message (``[value=<number>]``) is judged by the metric's thresholds; without a value, or without thresholds, the
measurement is Successful. 1 = Failed (the check itself failed). Anything else (another exit code, the deadline,
a pod that never ran) = Error: it could not measure. Credentials the Job needs come from Secrets its template
mounts; the operator never reads them. The pod gets no service account token unless its template sets
``automountServiceAccountToken: true`` (scoring an endpoint needs no API access).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final

from pydantic import Field, WithJsonSchema, field_validator

from shipyard import contract
from shipyard.contract import schema
from shipyard.operator import analysis, naming
from shipyard.operator.providers import base as base_mod

if TYPE_CHECKING:
    from shipyard.operator import observed as observed_mod
    from shipyard.operator import spec as spec_mod
    from shipyard.operator.providers import base

COMPONENT: Final = base_mod.MEASUREMENT_COMPONENT
LABEL_METRIC: Final = base_mod.LABEL_METRIC
LABEL_RUN: Final = base_mod.LABEL_RUN


_PRESERVED: Final = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
# A pod template as a Job takes it: its fields are the API server's to validate when the Job is created (a refused
# Job stalls the model naming it); the CRD only requires what the operator needs, spec.containers.
TEMPLATE_SCHEMA: Final = {
    "type": "object", "required": ["spec"],
    "properties": {
        "metadata": {**_PRESERVED, "description": "Labels and annotations of the Job's pod."},
        "spec": {**_PRESERVED, "description": "The pod spec (as in a Job's spec.template.spec).",
                 "required": ["containers"],
                 "properties": {"containers": {
                     "type": "array", "minItems": 1, "maxItems": 16, "description": "The pod's containers.",
                     "items": {**_PRESERVED, "description": "A container, as in a pod spec.", "required": ["name"]},
                 }}},
    },
}


class Job(schema.ApiModel):
    """A Kubernetes Job run against the candidate; its exit code is the verdict, its termination message may carry
    a value."""

    template: Annotated[dict[str, Any], WithJsonSchema(TEMPLATE_SCHEMA)]
    """Pod template of the Job (metadata and spec, as in a Job's spec.template); restartPolicy is set to Never,
    automountServiceAccountToken defaults to false."""
    active_deadline_seconds: Annotated[int, Field(ge=10, le=86400)] = 600
    """Longest a measurement's Job may run; past it the measurement is an Error. Default 600."""
    backoff_limit: Annotated[int, Field(ge=0, le=10)] = 0
    """Retries of the Job's pod before the measurement is an Error. Default 0."""

    @field_validator("template")
    @classmethod
    def _has_containers(cls, template: dict[str, Any]) -> dict[str, Any]:
        spec = template.get("spec")
        containers = spec.get("containers") if isinstance(spec, dict) else None
        if not isinstance(containers, list) or not containers or not all(isinstance(c, dict) for c in containers):
            raise ValueError("@spec.containers: a job metric's template must have containers (a pod template, as "
                             "in a Job)")
        return template


def build_job_name(model: str, version: str, metric: str, run: int) -> str:
    """The Job of a metric's ``run``-th measurement of a version (<= 63 characters, stable across restarts)."""
    version_hash = hashlib.sha256(version.encode()).hexdigest()[:8]
    return naming.build_name(model, metric, version_hash, str(run))


def build_service_url(model: str, version: str, namespace: str, port: int) -> str:
    """The base URL of a version's own Service (``objects.build_version_service``)."""
    return f"http://{naming.build_deployment_name(model, version)}.{namespace}.svc:{port}"


def build_job(*, object_meta: Callable[[str, Mapping[str, str]], dict[str, Any]], metric: spec_mod.Metric,
              model: str, served_model: str, namespace: str, candidate: str, stable: str | None, port: int,
              run: int) -> dict[str, Any]:
    """The Job measuring ``metric`` for the candidate (its ``run``-th measurement); ``object_meta(name, labels)``
    builds its metadata (owner reference, managed-by label). Pure."""
    spec = metric.job
    assert spec is not None
    template: dict[str, Any] = {k: v for k, v in spec.template.items() if k in ("metadata", "spec")}
    pod_spec: dict[str, Any] = dict(template.get("spec") or {})
    env = [
        {"name": contract.ENV_ENDPOINT, "value": build_service_url(model, candidate, namespace, port)},
        {"name": contract.ENV_MODEL_NAME, "value": served_model},
        {"name": contract.ENV_MODEL_VERSION, "value": candidate},
        {"name": contract.ENV_METRIC_NAME, "value": metric.name},
    ]
    if stable is not None:
        env += [{"name": contract.ENV_REFERENCE_ENDPOINT, "value": build_service_url(model, stable, namespace, port)},
                {"name": contract.ENV_STABLE_VERSION, "value": stable}]
    ours = {e["name"] for e in env}

    def with_env(container: Mapping[str, Any]) -> dict[str, Any]:
        own = [e for e in container.get("env") or [] if e.get("name") not in ours]
        return {**container, "env": [*own, *env]}

    pod_spec["containers"] = [with_env(c) for c in pod_spec.get("containers") or []]
    if pod_spec.get("initContainers"):  # e.g. one waiting for the endpoint
        pod_spec["initContainers"] = [with_env(c) for c in pod_spec["initContainers"]]
    pod_spec["restartPolicy"] = "Never"
    # As on every pod the operator creates: no API credentials unless the template asks for them.
    pod_spec.setdefault("automountServiceAccountToken", False)
    labels = {**naming.build_version_labels(model, candidate), naming.LABEL_COMPONENT: COMPONENT,
              LABEL_METRIC: metric.name, LABEL_RUN: str(run)}
    pod_meta = dict(template.get("metadata") or {})
    # The operator watches these pods (their termination message and exit code are the measurement).
    pod_meta["labels"] = {**(pod_meta.get("labels") or {}), **labels, naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(build_job_name(model, candidate, metric.name, run), labels),
        "spec": {
            "backoffLimit": spec.backoff_limit,
            "activeDeadlineSeconds": spec.active_deadline_seconds,
            "template": {"metadata": pod_meta, "spec": pod_spec},
        },
    }


def build_sample(view: observed_mod.JobView) -> analysis.Sample | None:
    """The measurement a finished Job reports; None while it runs. Pure."""
    query = f"Job {view.name}"
    if view.phase in ("Pending", "Running"):
        return None
    message = view.message.strip()
    if view.phase == "Succeeded" and view.exit_code in (None, contract.EXIT_MEASURED):
        value = contract.parse_value_field(message)
        shown = f"{query}: {message}" if message else query
        if value is None:
            return analysis.Sample(value=None, query=shown, verdict=analysis.Phase.SUCCESSFUL,
                                   note="exit code 0" + (f": {message}" if message else ""))
        return analysis.Sample(value=value, query=shown)
    if view.exit_code == contract.EXIT_FAILED:
        return analysis.Sample(value=None, query=query, verdict=analysis.Phase.FAILED,
                               note=f"exit code 1: {message}" if message else "exit code 1")
    code = f"exit code {view.exit_code}" if view.exit_code is not None else "no exit code"
    return analysis.Sample(value=None, query=query, error=f"the Job could not measure ({code}): "
                                                          f"{message or view.reason or 'failed'}")


class JobBackend:
    key: ClassVar[str] = "job"
    planned: ClassVar[bool] = True

    def uses_pods(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis, env: base.Env) -> bool:
        return False

    def spec_address(self, metric: spec_mod.Metric, analysis_spec: spec_mod.Analysis,
                     index: int) -> tuple[str, str] | None:
        return None  # the Job runs in the cluster, with the network policy of its namespace

    def relative_floor(self, metric: spec_mod.Metric) -> float:
        return 0.0  # never compared with the stable (admission)

    async def measure(self, request: base.MeasurementRequest, env: base.Env) -> analysis.Sample:
        raise AssertionError("job metrics are measured by their planned Jobs, not pulled")

    def build_child_name(self, model: str, version: str, metric: str, run: int) -> str:
        return build_job_name(model, version, metric, run)

    def build_child(self, *, object_meta: Callable[[str, Mapping[str, str]], dict[str, Any]],
                    metric: spec_mod.Metric, model: str, served_model: str, namespace: str, candidate: str,
                    stable: str | None, port: int, run: int) -> dict[str, Any]:
        return build_job(object_meta=object_meta, metric=metric, model=model, served_model=served_model,
                         namespace=namespace, candidate=candidate, stable=stable, port=port, run=run)

    def build_sample(self, view: observed_mod.JobView) -> analysis.Sample | None:
        return build_sample(view)


BACKEND: Final = JobBackend()
