"""Builds the contents of the digits-torchserve image: TorchServe's model store with the digits model archived by
torch-model-archiver (the handler of this folder; ``--archive-format no-archive``: an unpacked directory, no
extraction at start) and TorchServe's config.properties.

    python examples/torchserve/build_image.py OUT      # OUT/config.properties, OUT/model-store/digits/

A Dockerfile would do the same on top of ``pytorch/torchserve`` (COPY config.properties, COPY model-store). The e2e
node agent's image catalogue (hack/e2e-images.yaml) runs this once and mounts OUT at /home/model-server.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    store = out / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "digits"
        subprocess.run([sys.executable, str(REPO / "examples/models/build_models.py"), "digits", str(model)],
                       check=True)
        subprocess.run([archiver, "--model-name", "digits", "--version", "1.0", "--handler", str(HERE / "handler.py"),
                        "--extra-files", str(model), "--export-path", str(store), "--archive-format", "no-archive",
                        "--force"], check=True)
    shutil.copyfile(HERE / "config.properties", out / "config.properties")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
