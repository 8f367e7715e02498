"""hack/cluster.py puts the kubectl built at the cluster's version first on PATH, once, keeping the rest in order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.modules import load_file

CLUSTER = load_file("shipyard_hack_cluster_unit", Path(__file__).parents[2] / "hack" / "cluster.py")


@pytest.mark.parametrize(("path_before", "path_after"), [
    ("/usr/bin:/bin", "{k}:/usr/bin:/bin"),
    ("{k}:/usr/bin", "{k}:/usr/bin"),
    ("/usr/bin:{k}:/bin", "{k}:/usr/bin:/bin"),
    ("", "{k}"),
], ids=["prepended", "already-first", "moved-first", "empty"])
def test_use_pinned_kubectl(monkeypatch: pytest.MonkeyPatch, tmp_path, path_before: str, path_after: str) -> None:
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    k = str(tmp_path / "bin" / f"kubernetes-{CLUSTER.read_versions()['KUBE_VERSION']}")
    monkeypatch.setenv("PATH", path_before.format(k=k))
    assert str(CLUSTER.use_pinned_kubectl()) == k
    assert os.environ["PATH"] == path_after.format(k=k)


def test_exports_name_the_kubeconfig_and_the_pinned_kubectl(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("SHIPYARD_CACHE", str(tmp_path))
    state = CLUSTER.State(dir=str(tmp_path / "state"), started_at=0.0)
    CLUSTER.print_exports(state)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"export KUBECONFIG={state.kubeconfig}"
    assert lines[1].startswith(f'export PATH="{tmp_path}/bin/kubernetes-v1.')
    assert lines[1].split("#")[0].rstrip().endswith(':$PATH"')
