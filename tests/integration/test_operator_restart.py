"""The operator as a real process, killed with SIGKILL in the middle of its work and restarted: it converges to
the right end state with no duplicate Jobs or Deployments and a correct history. (Its own module: no in-process
operator may run beside it.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import Cluster, create_artifacts_volume
from tests.integration.test_operator_rollout import COMPRESSION, events, healthy, model, names, wait_status

pytestmark = pytest.mark.integration


def test_operator_killed_mid_rollout_continues_without_duplicates(cluster: Cluster, namespace: str) -> None:
    """The operator as a real process, SIGKILLed during a canary step and during compression, then restarted."""
    create_artifacts_volume(cluster, namespace)
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    command = [sys.executable, "-m", "shipyard.operator.main", "--namespace", namespace, "--metrics-port", "0",
               "--liveness", ""]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    steps = [{"weight": 25, "pause": "3s"}, {"weight": 50, "pause": "3s"}]
    proc = start()
    try:
        cluster.apply(model("crash", "1.0.0", rollout={"steps": steps}), namespace)
        wait_status(cluster, namespace, "crash", healthy("1.0.0"), message="1.0.0 healthy")
        cluster.apply(model("crash", "1.1.0", compression=COMPRESSION, rollout={"steps": steps}), namespace)
        wait_status(cluster, namespace, "crash", lambda m: m["status"].get("phase") == "Compressing",
                    message="compressing")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start()
        wait_status(cluster, namespace, "crash", lambda m: m["status"].get("stepReadyAt") is not None,
                    message="a canary step ready")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(1)
        proc = start()
        md = wait_status(cluster, namespace, "crash", healthy("1.1.0"), 90, message="1.1.0 healthy after restarts")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert names(cluster, "deployments", namespace) == ["crash-1-0-0", "crash-1-1-0"]
    assert len(names(cluster, "jobs", namespace)) == 1
    assert [(h["version"], h["outcome"]) for h in md["status"]["history"]] == [
        ("1.0.0", "Superseded"), ("1.1.0", "Promoted")]
    assert events(cluster, namespace, "crash").count("RolloutStarted") == 1
