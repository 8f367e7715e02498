"""The stack's OCI registry (hack/registry.py: CNCF distribution on 127.0.0.1, TLS with a CA of its own) as tests use
it: start it in a state directory, push model artifacts with the oras CLI (as users do) and images built here as OCI
image layouts, and count what clients pulled from its access log.

    registry = start_registry(tmp_path / "registry")
    digest = registry.push_artifact("models/digits:v1", {"model.safetensors": data})   # or a directory: Path
    digest = registry.push_image("models/digits-image:v1", [{"models/digits/model.bin": data}])
    ...  # the code under test fetches oci://{registry.address}/models/digits:v1 with --ca-bundle registry.ca
    assert registry.pulls("models/digits") == 1
    registry.stop()

`pulls` counts successful blob GETs of a repository (one per blob download, a resumed one counts again); a
manifest GET or HEAD never counts (`manifest_gets` counts those). The session fixture ``oci_registry``
(tests/conftest.py) is one anonymous registry shared by every test of a run: use repository names of the test's
own, and compare counts before and after rather than from zero.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import stack

registry_mod = stack.load_hack_module("registry")
cluster_mod = stack.load_hack_module("cluster")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ARTIFACT_TYPE = "application/vnd.shipyard.model.v1"


def oras_binary() -> Path:
    """The oras CLI that hack/build-binaries.sh builds (``SHIPYARD_ORAS`` overrides)."""
    override = os.environ.get("SHIPYARD_ORAS")
    if override:
        return Path(override)
    version = cluster_mod.read_versions()["ORAS_VERSION"]
    path = Path(cluster_mod.cache_dir()) / "bin" / f"oras-{version}" / "oras"
    if not (path.exists() and Path(f"{path}.ok").exists()):
        raise RuntimeError(f"{path} not found: build it with `bash hack/build-binaries.sh` (oras {version})")
    return path


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_layer(files: Mapping[str, bytes | None], *, dirs: Sequence[str] = (),
                symlinks: Mapping[str, str] | None = None) -> bytes:
    """A gzip-compressed tar layer (pure): `files` path -> bytes (None: a whiteout `.wh.<name>` for that path; a
    name ending in `.wh..wh..opq` is written as the opaque marker it is), `dirs` directories, `symlinks` path ->
    target."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, data in files.items():
            if data is None:
                parent, _, base = path.rpartition("/")
                name = path if base.startswith(".wh.") else f"{parent + '/' if parent else ''}.wh.{base}"
                tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
                continue
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for path, target in (symlinks or {}).items():
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return gzip.compress(raw.getvalue(), mtime=0)


OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def write_image_layout(folder: Path, tag: str, layers: Sequence[bytes],
                       platforms: Mapping[str, Sequence[bytes]] | None = None) -> str:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/) holding one linux/amd64 image of `layers` (gzip
    tar blobs), tagged `tag`; returns the manifest's digest. With `platforms` (architecture -> layers), `tag` names
    an image index of one linux image per architecture instead, and the index's digest is returned."""
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = _sha(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    def image(arch: str, image_layers: Sequence[bytes]) -> dict[str, Any]:
        diff_ids = [_sha(gzip.decompress(layer)) for layer in image_layers]
        config = json.dumps({"architecture": arch, "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}, sort_keys=True).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": put(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": put(layer), "size": len(layer)} for layer in image_layers],
        }, sort_keys=True).encode()
        return {"mediaType": OCI_MANIFEST, "digest": put(manifest), "size": len(manifest),
                "platform": {"os": "linux", "architecture": arch}}

    if platforms:
        inner = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": [image(arch, ls) for arch, ls in platforms.items()]}, sort_keys=True).encode()
        top = {"mediaType": OCI_INDEX, "digest": put(inner), "size": len(inner)}
    else:
        top = image("amd64", layers)
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]}
    (folder / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (folder / "index.json").write_text(json.dumps(index))
    return str(top["digest"])


@dataclass
class Registry:
    address: str  # 127.0.0.1:PORT
    ca: Path  # the PEM of the CA its certificate is signed by
    log: Path  # its output, access-log lines included
    state_dir: Path
    pid: int
    credentials: Path | None = None  # with htpasswd: {"username", "password"}

    def stop(self) -> None:
        """Stops the registry (SIGTERM, SIGKILL after a grace period; returns once it is gone). Data stays."""
        registry_mod.stop(self.state_dir)

    def restart(self) -> Registry:
        """Starts it again on the same port, with the same data, CA and credentials."""
        info = registry_mod.start(self.state_dir, int(self.address.rsplit(":", 1)[1]),
                                  htpasswd=self.credentials is not None)
        self.pid = int(info["pid"])
        return self

    def login(self) -> tuple[str, str]:
        assert self.credentials is not None, "an anonymous registry"
        creds = json.loads(self.credentials.read_text())
        return str(creds["username"]), str(creds["password"])

    def requests(self) -> list[dict[str, Any]]:
        """Every request so far, parsed from the access log (hack/registry.py ``parse_access_log_line``)."""
        return list(registry_mod.parse_access_log(self.log.read_text(errors="replace")))

    def pulls(self, repository: str) -> int:
        """Successful blob GETs (200, 206) of `repository` so far."""
        prefix = f"/v2/{repository}/blobs/sha256:"
        return sum(1 for r in self.requests()
                   if r["method"] == "GET" and r["uri"].startswith(prefix) and r["status"] in (200, 206))

    def manifest_requests(self, repository: str) -> int:
        """GETs and HEADs of `repository`'s manifests so far (any status)."""
        prefix = f"/v2/{repository}/manifests/"
        return sum(1 for r in self.requests() if r["method"] in ("GET", "HEAD") and r["uri"].startswith(prefix))

    def oras(self, *args: str, cwd: Path | None = None, side: str = "") -> str:
        """Runs the oras CLI against this registry (trusting its CA; logged in when it has credentials); returns
        stdout, raises with stderr on failure. `side`: "to-" for `oras cp`, whose remote flags are prefixed."""
        argv = [str(oras_binary()), *args, f"--{side}ca-file", str(self.ca),
                f"--{side}registry-config", str(self.state_dir / "oras-config.json")]
        if self.credentials is not None:
            user, password = self.login()
            argv += [f"--{side}username", user, f"--{side}password", password]
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "HOME": str(self.state_dir)}
        out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"oras {args[0]} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        return out.stdout

    def push_artifact(self, repo_tag: str, files: Mapping[str, bytes | Path], workdir: Path | None = None) -> str:
        """`oras push` of `files` (name -> bytes, or a Path: a file, or a directory ORAS packs as a tar+gzip layer)
        as an artifact of type application/vnd.shipyard.model.v1; returns its manifest digest."""
        folder = workdir or self.state_dir / "push" / hashlib.sha256(repo_tag.encode()).hexdigest()[:12]
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for name, data in files.items():
            if isinstance(data, Path):
                target = folder / name
                if not target.exists():  # a copy: oras packs a symbolic link as the link it is
                    if data.is_dir():
                        shutil.copytree(data, target)
                    else:
                        shutil.copyfile(data, target)
                names.append(name if data.is_dir() else f"{name}:application/octet-stream")
            else:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
                names.append(f"{name}:application/octet-stream")
        out = self.oras("push", f"{self.address}/{repo_tag}", "--artifact-type", ARTIFACT_TYPE,
                        "--format", "json", *names, cwd=folder)
        return str(json.loads(out)["digest"])

    def push_image(self, repo_tag: str, layers: Sequence[bytes], workdir: Path | None = None,
                   platforms: Mapping[str, Sequence[bytes]] | None = None) -> str:
        """Pushes an image of `layers` (see `build_layer`), or with `platforms` an index of one image per
        architecture, from an OCI image layout written here (`oras cp --from-oci-layout`, which copies an index with
        its manifests); returns the digest the tag names."""
        tag = repo_tag.rsplit(":", 1)[1]
        folder = workdir or self.state_dir / "layouts" / hashlib.sha256(repo_tag.encode()).hexdigest()[:12]
        digest = write_image_layout(folder, tag, layers, platforms)
        self.oras("cp", "--from-oci-layout", f"{folder}:{tag}", f"{self.address}/{repo_tag}", side="to-")
        return digest


def start_registry(state_dir: Path, port: int | None = None, htpasswd: bool = False) -> Registry:
    """Starts hack/registry.py's registry in `state_dir` and returns it once it answers. Raises RuntimeError when it
    is not built (the message names ``bash hack/build-binaries.sh``) or does not start (with its log's tail)."""
    info = registry_mod.start(state_dir, port, htpasswd=htpasswd)
    return Registry(address=info["address"], ca=Path(info["ca"]), log=Path(info["log"]),
                    state_dir=state_dir.resolve(), pid=int(info["pid"]),
                    credentials=Path(info["credentials"]) if "credentials" in info else None)
