"""Names and labels of the objects Shipyard owns: pure functions, no I/O.

Every name fits the 63-character DNS label limit: when ``<model>-<version>`` would be longer, it is cut and a
short hash of the full name is appended, so two versions never collide and the same input always gives the
same name (the operator can restart and find its objects again).
"""

from __future__ import annotations

import hashlib
import re

GROUP = "shipyard.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
FIELD_MANAGER = "shipyard-operator"

LABEL_MODEL = f"{GROUP}/model"
LABEL_VERSION = f"{GROUP}/version"
LABEL_COMPONENT = f"{GROUP}/component"
LABEL_ARTIFACT = f"{GROUP}/artifact"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "shipyard"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
ANNOTATION_IMAGE = f"{GROUP}/image"
ANNOTATION_METRICS_PORT = f"{GROUP}/port"  # the port a pod's /metrics is scraped at, where not its serving port
COMPONENT_ACTIVATOR = "activator"

MAX_NAME = 63
_INVALID = re.compile(r"[^a-z0-9-]+")


def build_slug(text: str) -> str:
    """Lower-cases and replaces every run of characters not allowed in a DNS label with '-'."""
    return _INVALID.sub("-", text.lower()).strip("-") or "x"


def build_name(*parts: str, limit: int = MAX_NAME) -> str:
    """Joins slugged parts with '-'; if too long, cuts and appends an 8-hex hash of the untruncated name."""
    full = "-".join(build_slug(p) for p in parts if p)
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    return f"{full[: limit - 9].rstrip('-')}-{digest}"


def build_label_value(text: str) -> str:
    """A valid label value (<= 63 chars of [A-Za-z0-9._-], alphanumeric at both ends) for any string."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    if len(value) > MAX_NAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        value = f"{value[: MAX_NAME - 9].rstrip('-._')}-{digest}"
    return value


def build_deployment_name(model: str, version: str) -> str:
    return build_name(model, version)


def build_service_name(model: str) -> str:
    return build_name(model)


def build_preview_service_name(model: str) -> str:
    """The blue-green preview Service: the candidate before the switch."""
    return build_name(model, "preview")


def build_shadow_config_name(model: str) -> str:
    """The ConfigMap of the shadow settings, mounted (optional) into every pod of Shipyard's own server."""
    return build_name(model, "shadow")


def build_selector_labels(model: str) -> dict[str, str]:
    """Labels shared by every serving pod of a model: the Service selects on these."""
    return {LABEL_MODEL: build_label_value(model), LABEL_COMPONENT: "serving"}


def build_activator_name(model: str) -> str:
    """The Deployment of the activator, which holds a scaled-to-zero model's requests until a pod is Ready."""
    return build_name(model, "activator")


def build_activator_labels(model: str) -> dict[str, str]:
    """The activator's pods: the model's Service selects them while the model has no ready pod (scale to zero)."""
    return {LABEL_MODEL: build_label_value(model), LABEL_COMPONENT: COMPONENT_ACTIVATOR}


def build_version_labels(model: str, version: str) -> dict[str, str]:
    return {**build_selector_labels(model), LABEL_VERSION: build_label_value(version)}
