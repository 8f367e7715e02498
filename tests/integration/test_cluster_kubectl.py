"""The kubectl the suite (and ``eval "$(hack/cluster.py up)"``) uses is the one built at the cluster's own version:
kubectl supports one minor of skew against the API server, and a machine's own kubectl can be far from v1.36."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.integration.conftest import Cluster, _load_cluster_module

pytestmark = pytest.mark.integration


def minor(version: str) -> int:
    return int(version.lstrip("v").split(".")[1])


def test_kubectl_matches_the_api_server(cluster: Cluster) -> None:
    versions = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    client, server = versions["clientVersion"]["gitVersion"], versions["serverVersion"]["gitVersion"]
    assert abs(minor(client) - minor(server)) <= 1, versions
    if os.environ.get("SHIPYARD_TEST_KUBECONFIG"):
        return  # someone else's cluster: only the skew is ours to check
    mod = _load_cluster_module()
    pinned = mod.read_versions()["KUBE_VERSION"]
    assert shutil.which("kubectl") == str(mod.binaries()["kubectl"])
    assert client == server == pinned, versions
