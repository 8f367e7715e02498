"""The suite's own rules (tests/rules.py), checked on tiny generated test files run by a pytest of their own (a
subprocess with the rules as its only plugin and its own allow-list): an unlisted skip fails the session, at run and
at collection time, a listed one passes and prints its reason; the gpu marker skips without a declared GPU and
fails with one that does not work. Also the smoke test a GPU run runs first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import rules

pytestmark = [pytest.mark.harness, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

SKIP_AT_RUN = """
    import pytest
    def test_runs():
        pass
    def test_skips():
        pytest.skip("not today")
"""
SKIPIF = """
    import pytest
    def test_runs():
        pass
    @pytest.mark.skipif(True, reason="a condition")
    def test_skips():
        pass
"""
XFAIL = """
    import pytest
    def test_runs():
        pass
    @pytest.mark.xfail(reason="known bug")
    def test_skips():
        assert False
"""
PARAMS = """
    import pytest
    @pytest.mark.parametrize("x", ["a", "b"])
    def test_skips(x):
        if x == "b":
            pytest.skip("b is not for here")
"""
MODULE_SKIP = """
    import pytest
    pytest.skip("the whole module", allow_module_level=True)
    def test_never():
        pass
"""
IMPORTORSKIP = """
    import pytest
    pytest.importorskip("shipyard_no_such_module")
    def test_never():
        pass
"""
GPU = """
    import pytest
    @pytest.mark.gpu
    def test_on_gpu():
        pass
"""
PASSES = """
    def test_passes():
        pass
"""


def run_pytest(tmp_path: Path, files: dict[str, str], allowed: dict[str, str], env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    for name, body in files.items():
        (tmp_path / name).write_text(textwrap.dedent(body))
    (tmp_path / "skips.yaml").write_text("".join(f"{k}: {v}\n" for k, v in allowed.items()))
    (tmp_path / "pytest.ini").write_text("[pytest]\nshipyard_skips = skips.yaml\naddopts = --strict-markers\n"
                                         "asyncio_default_fixture_loop_scope = function\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", rules.GPU_ENV))}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.rules", "-p", "no:cacheprovider", "-q",
                           "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env={**environment, **(env or {})}, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.parametrize(("files", "allowed", "env", "code", "says"), [
    pytest.param({"test_a.py": SKIP_AT_RUN}, {}, {}, 1,
                 ["FAILED: skip not in the allow-list (skips.yaml): test_a.py::test_skips: not today"],
                 id="unlisted-skip-fails"),
    pytest.param({"test_a.py": SKIP_AT_RUN}, {"test_a.py::test_skips": "allowed for a reason"}, {}, 0,
                 ["allowed skip test_a.py::test_skips: allowed for a reason (it said: not today)"],
                 id="listed-skip-passes-with-its-reason"),
    pytest.param({"test_a.py": SKIPIF}, {}, {}, 1, ["test_a.py::test_skips: a condition"], id="unlisted-skipif-fails"),
    pytest.param({"test_a.py": XFAIL}, {}, {}, 1, ["test_a.py::test_skips: xfail: known bug"],
                 id="unlisted-xfail-fails"),
    pytest.param({"test_a.py": PARAMS}, {"test_a.py::test_skips[a]": "the other one"}, {}, 1,
                 ["FAILED: skip not in the allow-list (skips.yaml): test_a.py::test_skips[b]"],
                 id="another-parameter-listed-fails"),
    pytest.param({"test_a.py": PARAMS}, {"test_a.py::test_skips[b]": "b only"}, {}, 0,
                 ["allowed skip test_a.py::test_skips[b]: b only"], id="listed-parameter-passes"),
    pytest.param({"test_a.py": PARAMS}, {"test_a.py::test_skips": "every parameter"}, {}, 0,
                 ["allowed skip test_a.py::test_skips[b]: every parameter"], id="listed-test-covers-its-parameters"),
    pytest.param({"test_a.py": MODULE_SKIP, "test_b.py": PASSES}, {}, {}, 1,
                 ["FAILED: skip not in the allow-list (skips.yaml): test_a.py: the whole module"],
                 id="unlisted-collection-skip-fails"),
    pytest.param({"test_a.py": MODULE_SKIP}, {}, {}, 1, ["test_a.py: the whole module"],
                 id="collection-skip-alone-fails"),
    pytest.param({"test_a.py": MODULE_SKIP, "test_b.py": PASSES}, {"test_a.py": "a module for elsewhere"}, {}, 0,
                 ["allowed skip test_a.py: a module for elsewhere"], id="listed-collection-skip-passes"),
    pytest.param({"test_a.py": IMPORTORSKIP, "test_b.py": PASSES}, {}, {}, 1,
                 ["test_a.py: could not import 'shipyard_no_such_module'"], id="unlisted-importorskip-fails"),
    pytest.param({"test_a.py": GPU}, {}, {}, 0, [f"allowed skip test_a.py::test_on_gpu: {rules.NO_GPU}"],
                 id="gpu-without-declaration-skips-allowed"),
    pytest.param({"test_a.py": GPU}, {}, {rules.GPU_ENV: "1", "CUDA_VISIBLE_DEVICES": ""}, 1,
                 [f"{rules.GPU_ENV} declares a GPU, but torch.cuda.is_available() is False", "1 error"],
                 id="gpu-declared-without-cuda-errors"),
    pytest.param({"test_a.py": PASSES}, {}, {}, 0, ["1 passed"], id="no-skip-passes"),
])
def test_skip_rules(tmp_path: Path, files: dict[str, str], allowed: dict[str, str], env: dict[str, str], code: int,
                    says: list[str]) -> None:
    out = run_pytest(tmp_path, files, allowed, env)
    output = out.stdout + out.stderr
    assert out.returncode == code, output
    for text in says:
        assert text in output, output


@pytest.mark.gpu
def test_a_cuda_operation_runs() -> None:
    """The first check of a run that declares a GPU: torch sees one and computes on it."""
    import torch

    x = torch.ones(256, 256, device="cuda")
    assert float((x @ x).sum().item()) == 256.0 ** 3
