"""The digits model kept in the stack's S3 server (hack/s3.py) and served from it, for the e2e scenarios of
downloaded models and for `make demo`:

    python -m tests.e2e.s3model up --dir D --namespace NS [--replicas 4]     # starts the server in D (if needed),
        # uploads the digits model of the local image catalogue to s3://models/digits/v1/ and prints the Secret and
        # the ModelDeployment (examples/digits-s3.yaml, pointed at this server) as one YAML List
    python -m tests.e2e.s3model downloads --dir D                           # GetObject requests per object so far

The model's directory is the one the node agent's image catalogue builds for registry.example/shipyard/digits-model
(examples/models/build_models.py digits), so the demo serves the same weights from S3 as from the image.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests import stack
from tests.s3server import GET_OBJECT, S3Server, s3_mod, start_s3

REPO = Path(__file__).resolve().parents[2]
BUCKET = "models"
SECRET = "model-storage"
EXAMPLE = REPO / "examples" / "digits-s3.yaml"


def print_digest(path: Path) -> str:
    """The digest `shipyard-runtime fetch --print-digest` gives a file or directory (what spec.model.digest pins)."""
    out = subprocess.run([str(Path(sys.prefix) / "bin" / "shipyard-runtime"), "fetch", "--print-digest", str(path)],
                         check=True, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().split()[-1]


def upload(server: S3Server, root: Path, bucket: str, prefix: str) -> list[str]:
    """Every file under `root` as `prefix/<relative path>`; the keys, sorted."""
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        server.put_object(bucket, key, path)
        keys.append(key)
    return keys


def build_secret(server: S3Server, name: str = SECRET, secret_key: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": {"AWS_ACCESS_KEY_ID": server.access_key,
                           "AWS_SECRET_ACCESS_KEY": server.secret_key if secret_key is None else secret_key}}


def build_md(server: S3Server, uri: str, digest: str, *, name: str = "digits-s3", replicas: int = 4,
             secret: str = SECRET) -> dict[str, Any]:
    """examples/digits-s3.yaml pointed at this server (endpoint, region, the Secret), with quick canary steps."""
    md: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    md["metadata"]["name"] = name
    spec = md["spec"]
    spec["model"].update(uri=uri, digest=digest, credentials={"secretName": secret},
                         s3={"endpoint": server.endpoint, "region": server.region})
    spec["serving"]["replicas"] = replicas
    spec["serving"]["resources"] = {"requests": {"cpu": "50m", "memory": "256Mi"},
                                    "limits": {"cpu": "500m", "memory": "1Gi"}}
    spec["rollout"]["steps"] = [{"weight": 50, "pause": "2s"}]
    spec["rollout"]["analysis"]["interval"] = "2s"
    return md


def downloads_by_key(server_dir: Path) -> Counter[str]:
    """Successful GetObject requests per bucket/key in the server's access log."""
    log = server_dir / s3_mod.ACCESS_LOG
    requests = s3_mod.parse_access_log(log.read_text(errors="replace")) if log.exists() else []
    return Counter(f"{r['bucket']}/{r['key']}" for r in requests
                   if r["operation"] == GET_OBJECT and r["status"] in (200, 206))


def catalogue_model_dir(build: str = "digits") -> Path:
    """A model's directory as the node agent's image catalogue builds it (hack/e2e-images.yaml's builds: digits,
    minilm...), built here if it was not."""
    agent = stack.load_hack_module("node_agent")
    catalogue = agent.Catalogue(REPO / "hack" / "e2e-images.yaml",
                                agent.build_parser().parse_args(["--kubeconfig", "-", "--workdir", "-"]).image_cache,
                                sys.executable)
    out: Path = catalogue.build_dir(build)
    if not out.is_dir():
        import asyncio
        out = asyncio.run(catalogue.prepare(build))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "downloads"])
    parser.add_argument("--dir", type=Path, required=True, help="the S3 server's state directory")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--replicas", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "downloads":
        for key, count in sorted(downloads_by_key(args.dir).items()):
            print(f"{count:4d}  GET s3://{key}")
        return 0
    server = start_s3(args.dir)
    server.make_bucket(BUCKET)
    model = catalogue_model_dir()
    upload(server, model, BUCKET, "digits/v1")
    md = build_md(server, f"s3://{BUCKET}/digits/v1/", print_digest(model), replicas=args.replicas)
    md["metadata"]["namespace"] = args.namespace
    secret = build_secret(server)
    secret["metadata"]["namespace"] = args.namespace
    print(json.dumps({"apiVersion": "v1", "kind": "List", "items": [secret, md]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
