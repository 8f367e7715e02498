"""The pure parts of `oci://` fetches: references, challenges, Docker config credentials, manifest selection and
kinds, artifact files, image layer actions (whiteouts under --path), registry error bodies; and applying layers to a
directory (files written here, nothing over the network). The real registry: tests/integration/test_fetch_oci.py."""

from __future__ import annotations

import base64
import io
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from shipyard.runtime.fetch import archives, command, oci, sources
from shipyard.runtime.fetch.errors import ArchiveError, FetchError, UsageError
from shipyard.runtime.fetch.progress import Progress

H = "a" * 64
D = f"sha256:{H}"


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest", "display"), [
    ("127.0.0.1:5000/models/digits:v1", "127.0.0.1:5000", "models/digits", "v1", "", "oci://127.0.0.1:5000/models/digits:v1"),
    ("ghcr.io/org/m", "ghcr.io", "org/m", "latest", "", "oci://ghcr.io/org/m:latest"),
    (f"r.example/m@{D}", "r.example", "m", "", D, f"oci://r.example/m@{D}"),
    (f"r.example/m:v2@sha256:{'A' * 64}", "r.example", "m", "v2", D, f"oci://r.example/m:v2@{D}"),
    ("localhost:5000/a/b/c-d_e.f:1.0-rc_1", "localhost:5000", "a/b/c-d_e.f", "1.0-rc_1", "",
     "oci://localhost:5000/a/b/c-d_e.f:1.0-rc_1"),
    ("[::1]:5000/m:t", "[::1]:5000", "m", "t", "", "oci://[::1]:5000/m:t"),
], ids=["port-tag", "default-latest", "pinned", "tag-and-pin", "separators", "ipv6"])
def test_parse_reference(text: str, registry: str, repository: str, tag: str, digest: str, display: str) -> None:
    ref = oci.parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.display) == (registry, repository, tag, digest,
                                                                                 display)
    assert ref.manifest_ref == (digest or tag)


@pytest.mark.parametrize(("text", "message"), [
    ("registry", "no repository"),
    ("registry/", "no repository"),
    ("user:pass@registry/m:v1", "credentials in the URI are refused"),
    ("registry/Models:v1", "invalid repository name"),
    ("registry/m:v!1", "invalid tag"),
    ("registry/m@sha256:123", "invalid digest"),
    ("registry/m@md5:" + "a" * 32, "invalid digest"),
    ("registry/a//b", "invalid repository name"),
    ("bad_host!/m", "invalid registry"),
    ("https://registry/m", "expected registry/repository"),
], ids=["no-repo", "empty-repo", "userinfo", "upper-case", "bad-tag", "short-digest", "md5", "empty-component",
        "bad-host", "nested-scheme"])
def test_parse_reference_refusals(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        oci.parse_reference(text)


def test_parse_uri_oci_and_no_secret_in_its_error() -> None:
    source = sources.parse_uri("oci://127.0.0.1:5000/models/m:v1")
    assert source.is_oci and source.display == "oci://127.0.0.1:5000/models/m:v1" and not source.is_s3
    with pytest.raises(UsageError) as error:
        sources.parse_uri("oci://me:s3cret@127.0.0.1:5000/models/m:v1")
    assert "s3cret" not in str(error.value) and "REDACTED" in str(error.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--uri", "https://h/m.bin", "--dest", "/d", "--path", "/models"], "only for oci://"),
    (["--uri", "oci://h/m:v1", "--dest", "/d", "--path", "/models/../etc"], "'..' in path"),
    (["--uri", f"oci://h/m@{D}", "--dest", "/d", "--digest", "sha256:" + "b" * 64], "differs from the digest"),
], ids=["path-not-oci", "path-dotdot", "two-digests"])
def test_build_config_refusals_for_oci(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        command.build_config(argv, {})


def test_build_config_reads_the_oci_flags_from_the_environment() -> None:
    config = command.build_config(["--uri", "oci://h/m:v1", "--dest", "/d"],
                                  {"SHIPYARD_FETCH_PATH": "/models/x", "SHIPYARD_FETCH_REGISTRY_CONFIG": "/c.json"})
    assert (config.path, config.registry_config) == ("/models/x", "/c.json")


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("", None), ("/", ""), ("/models/x/", "models/x"), ("models//x", "models/x"),
    ("model.bin", "model.bin"),
], ids=["none", "empty", "root", "slashes", "double", "file"])
def test_check_model_path(text: str | None, expected: str | None) -> None:
    assert oci.check_model_path(text) == expected


@pytest.mark.parametrize(("header", "scheme", "params"), [
    ('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:m:pull"', "bearer",
     {"realm": "https://auth.example/token", "service": "registry.example", "scope": "repository:m:pull"}),
    ('Basic realm="shipyard-registry"', "basic", {"realm": "shipyard-registry"}),
    ('Bearer realm="https://a/t",scope="repository:m:pull,push"', "bearer",
     {"realm": "https://a/t", "scope": "repository:m:pull,push"}),
    ("Bearer realm=https://a/t, service=r", "bearer", {"realm": "https://a/t", "service": "r"}),
    ('Bearer realm="a\\"b"', "bearer", {"realm": 'a"b'}),
], ids=["bearer", "basic", "comma-in-quotes", "unquoted", "escaped-quote"])
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    assert oci.parse_challenge(header) == (scheme, params)


@pytest.mark.parametrize(("params", "url"), [
    ({"realm": "https://a/token", "service": "r", "scope": "repository:m:pull"},
     "https://a/token?service=r&scope=repository%3Am%3Apull"),
    ({"realm": "https://a/token?x=1"}, "https://a/token?x=1&scope=repository%3Aother%3Apull"),
], ids=["challenge-scope", "default-scope"])
def test_build_token_url(params: dict[str, str], url: str) -> None:
    assert oci.build_token_url(params, "repository:other:pull") == url


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(("config", "registry", "expected"), [
    ({"auths": {"127.0.0.1:5000": {"auth": _b64("u:p:w")}}}, "127.0.0.1:5000", ("u", "p:w")),
    ({"auths": {"https://127.0.0.1:5000/v2/": {"username": "u", "password": "p"}}}, "127.0.0.1:5000", ("u", "p")),
    ({"auths": {"127.0.0.1:5000": {"auth": _b64("u:p")}}}, "127.0.0.1:5001", None),
    ({"auths": {"https://index.docker.io/v1/": {"auth": _b64("d:h")}}}, "docker.io", ("d", "h")),
    ({"127.0.0.1:5000": {"auth": _b64("old:cfg")}}, "127.0.0.1:5000", ("old", "cfg")),
    ({"auths": {"r": {"auth": "!!!"}}}, "r", None),
    ({"auths": {"r": {"identitytoken": "t"}}}, "r", None),
    ({"auths": {}, "credsStore": "desktop"}, "r", None),
], ids=["auth-base64", "username-password", "other-port", "docker-hub", "legacy-dockercfg", "bad-base64",
        "identity-token", "creds-store"])
def test_build_registry_credentials(config: dict[str, Any], registry: str, expected: tuple[str, str] | None) -> None:
    assert oci.build_registry_credentials(config, registry) == expected


def _entry(arch: str, os_name: str = "linux", digest: str = D) -> dict[str, Any]:
    return {"mediaType": oci.OCI_MANIFEST, "digest": digest, "size": 10,
            "platform": {"os": os_name, "architecture": arch}}


@pytest.mark.parametrize(("manifests", "chosen"), [
    ([_entry("arm64", digest="sha256:" + "1" * 64), _entry("amd64", digest="sha256:" + "2" * 64)], "2"),
    ([_entry("arm64", digest="sha256:" + "3" * 64)], "3"),
    ([_entry("amd64", digest="sha256:" + "4" * 64), _entry("unknown", "unknown", "sha256:" + "5" * 64)], "4"),
], ids=["by-platform", "the-only-one", "attestation-left-out"])
def test_select_manifest(manifests: list[dict[str, Any]], chosen: str) -> None:
    assert oci.select_manifest({"manifests": manifests}, "linux", "amd64").digest == "sha256:" + chosen * 64


def test_select_manifest_names_the_platforms_it_has() -> None:
    with pytest.raises(FetchError, match="no manifest for linux/amd64 .it has: linux/arm64, linux/s390x"):
        oci.select_manifest({"manifests": [_entry("s390x"), _entry("arm64")]}, "linux", "amd64")


@pytest.mark.parametrize(("doc", "content_type", "kind"), [
    ({"mediaType": oci.OCI_INDEX}, "", "index"),
    ({"mediaType": oci.DOCKER_LIST}, "", "index"),
    ({"layers": []}, oci.DOCKER_MANIFEST, "manifest"),
    ({"layers": []}, "application/json", "manifest"),
    ({"manifests": []}, "", "index"),
    ({"mediaType": oci.OCI_MANIFEST}, oci.OCI_INDEX, "manifest"),
], ids=["oci-index", "docker-list", "by-content-type", "by-shape-layers", "by-shape-manifests", "document-wins"])
def test_build_manifest_kind(doc: dict[str, Any], content_type: str, kind: str) -> None:
    assert oci.build_manifest_kind(doc, content_type) == kind


def test_a_schema1_manifest_is_refused() -> None:
    with pytest.raises(FetchError, match="unsupported manifest type"):
        oci.build_manifest_kind({"schemaVersion": 1}, "application/vnd.docker.distribution.manifest.v1+prettyjws")


@pytest.mark.parametrize(("config_type", "kind"), [
    ("application/vnd.oci.image.config.v1+json", "image"),
    ("application/vnd.docker.container.image.v1+json", "image"),
    ("application/vnd.oci.empty.v1+json", "artifact"),
    ("application/vnd.unknown.config.v1+json", "artifact"),
], ids=["oci-image", "docker-image", "oras-empty", "oras-unknown"])
def test_build_content_kind(config_type: str, kind: str) -> None:
    assert oci.build_content_kind({"config": {"mediaType": config_type}}) == kind


def _layer(title: str | None, digest: str = D, unpack: bool = False) -> oci.Descriptor:
    annotations = {oci.TITLE: title} if title is not None else {}
    if unpack:
        annotations[oci.UNPACK] = "true"
    return oci.Descriptor("application/vnd.oci.image.layer.v1.tar", digest, 1, annotations)


def test_build_artifact_files() -> None:
    files, skipped = oci.build_artifact_files([_layer("model.bin"), _layer(None), _layer("tok", unpack=True)])
    assert [(f.name, f.unpack) for f in files] == [("model.bin", False), ("tok", True)]
    assert len(skipped) == 1


@pytest.mark.parametrize(("titles", "message"), [
    (["../etc/passwd"], "'..' in path"),
    (["/abs"], "absolute path"),
    (["a", "a"], "twice"),
    ([".shipyard-fetch.json"], "reserved"),
], ids=["dotdot", "absolute", "twice", "reserved"])
def test_build_artifact_files_refusals(titles: list[str], message: str) -> None:
    with pytest.raises(FetchError, match=message):
        oci.build_artifact_files([_layer(t) for t in titles])


@pytest.mark.parametrize(("name", "prefix", "expected"), [
    ("models/x/model.bin", "models/x", ("extract", "model.bin")),
    ("./models/x/sub/a", "models/x", ("extract", "sub/a")),
    ("/models/x/a", "models/x", ("extract", "a")),
    ("models/x", "models/x", ("skip", "")),
    ("models/xy/a", "models/x", ("skip", "")),
    ("etc/passwd", "models/x", ("skip", "")),
    ("models/x/.wh.old.bin", "models/x", ("whiteout", "old.bin")),
    ("models/x/sub/.wh..wh..opq", "models/x", ("opaque", "sub")),
    ("models/x/.wh..wh..opq", "models/x", ("opaque", "")),
    ("models/.wh.x", "models/x", ("clear", "")),
    ("models/.wh..wh..opq", "models/x", ("clear", "")),
    (".wh.models", "models/x", ("clear", "")),
    ("models/.wh.y", "models/x", ("skip", "")),
    ("other/.wh..wh..opq", "models/x", ("skip", "")),
    ("models/x/../../etc/passwd", "models/x", ("skip", "")),
    ("./", "models/x", ("skip", "")),
    ("etc/passwd", "", ("extract", "etc/passwd")),
    ("etc/.wh.passwd", "", ("whiteout", "etc/passwd")),
    ("etc/.wh..wh..opq", "", ("opaque", "etc")),
    (".wh..wh..opq", "", ("opaque", "")),
], ids=["file", "dot-slash", "absolute", "the-dir-itself", "sibling-prefix", "outside", "whiteout", "opaque-sub",
        "opaque-top", "whiteout-of-the-model", "opaque-above", "whiteout-above", "whiteout-beside", "opaque-elsewhere",
        "dotdot-normalised-out", "root", "whole-fs-file", "whole-fs-whiteout", "whole-fs-opaque",
        "whole-fs-top-opaque"])
def test_build_layer_action(name: str, prefix: str, expected: tuple[str, str]) -> None:
    assert oci.build_layer_action(name, prefix) == expected


@pytest.mark.parametrize(("body", "detail"), [
    (b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v9"}}]}',
     "manifest unknown"),
    (b'{"errors":[{"code":"NAME_UNKNOWN"}]}', "NAME_UNKNOWN"),
    (b"<html>", ""), (b'{"errors": []}', ""), (b"", ""),
], ids=["message", "code-only", "html", "empty-list", "empty"])
def test_build_error_detail(body: bytes, detail: str) -> None:
    assert oci.build_error_detail(body) == detail


# -- layers applied to a directory -------------------------------------------------------------------------------

def _tar(path: Path, members: list[tuple[str, str, bytes | str]]) -> Path:
    """members: (name, kind: file|dir|symlink|hardlink, data or link target)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
            tar.addfile(info)
    return path


def _apply(tmp_path: Path, layers: list[list[tuple[str, str, bytes | str]]], prefix: str = "models/x") -> Path:
    model = tmp_path / "model"
    model.mkdir()
    budget = archives.Budget(1 << 20, 1 << 30, 0)
    for i, members in enumerate(layers):
        oci.apply_layer(_tar(tmp_path / f"l{i}.tar.gz", members), model, prefix, budget, threading.Event())
    return model


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = f"-> {p.readlink()}" if p.is_symlink() else ("dir" if p.is_dir() else p.read_text())
    return out


def test_layers_apply_in_order_with_whiteouts(tmp_path: Path) -> None:
    model = _apply(tmp_path, [
        [("models", "dir", ""), ("models/x", "dir", ""), ("models/x/a", "file", b"1"), ("models/x/b", "file", b"1"),
         ("models/x/sub/c", "file", b"1"), ("etc/passwd", "file", b"root")],
        [("models/x/a", "file", b"2"), ("models/x/.wh.b", "file", b""), ("models/x/sub/.wh..wh..opq", "file", b""),
         ("models/x/link", "symlink", "a"), ("models/x/hard", "hardlink", "models/x/a")],
    ])
    assert _tree(model) == {"a": "2", "hard": "2", "link": "-> a", "sub": "dir"}


def test_a_whiteout_of_the_model_directory_clears_it(tmp_path: Path) -> None:
    model = _apply(tmp_path, [[("models/x/a", "file", b"1")], [("models/.wh.x", "file", b"")],
                              [("models/x/b", "file", b"2")]])
    assert _tree(model) == {"b": "2"}


def test_a_file_replaces_a_directory_and_a_symlink(tmp_path: Path) -> None:
    model = _apply(tmp_path, [[("models/x/d/f", "file", b"1"), ("models/x/l", "symlink", "d")],
                              [("models/x/d", "file", b"now a file"), ("models/x/l", "file", b"now a file too")]])
    assert _tree(model) == {"d": "now a file", "l": "now a file too"}


@pytest.mark.parametrize(("members", "message"), [
    ([("models/x/l", "symlink", "/etc/passwd")], "absolute"),
    ([("models/x/l", "symlink", "../../etc")], "points outside"),
    ([("models/x/h", "hardlink", "etc/shadow")], "outside /models/x"),
    ([("models/x/a", "file", b"1"), ("models/x/a", "file", b"2")], "the same path twice"),
], ids=["absolute-symlink", "symlink-out", "hardlink-out", "twice-in-one-layer"])
def test_hostile_layers_are_refused(tmp_path: Path, members: list[tuple[str, str, bytes | str]], message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        _apply(tmp_path, [members])


def test_a_whiteout_never_follows_a_symlink_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    model = tmp_path / "model"
    model.mkdir()
    (model / "escape").symlink_to(outside)
    budget = archives.Budget(1 << 20, 1 << 30, 0)
    layer = _tar(tmp_path / "l.tar.gz", [("models/x/escape/.wh.keep", "file", b"")])
    with pytest.raises(ArchiveError, match="leads outside"):
        oci.apply_layer(layer, model, "models/x", budget, threading.Event())
    assert (outside / "keep").read_text() == "precious"


def test_layers_count_against_the_extraction_budget(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    budget = archives.Budget(1 << 20, 10, 0)
    layer = _tar(tmp_path / "l.tar.gz", [("models/x/big", "file", b"x" * 11)])
    with pytest.raises(ArchiveError, match="max-extracted-bytes"):
        oci.apply_layer(layer, model, "models/x", budget, threading.Event())


@pytest.mark.parametrize(("known_size", "trusted"), [(1, True), (2, False)], ids=["size-matches", "size-differs"])
def test_list_tree_trusts_a_verified_blob_of_the_same_size(tmp_path: Path, known_size: int, trusted: bool) -> None:
    from shipyard.runtime.fetch import digests

    (tmp_path / "a").write_bytes(b"x")
    (entry,) = digests.list_tree(tmp_path, known={"a": ("f" * 64, known_size)})
    assert (entry.sha256 == "f" * 64) is trusted
    assert entry.size == 1


class _StubClient:
    """What `materialize` asks of a client: blobs from local bytes (digests as given, unverified)."""

    display = "oci://r/m:v1"

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def download_blobs(self, blobs: Any, folder: Path, progress: Any) -> dict[str, Path]:
        out = {}
        for b in blobs:
            out[b.digest] = folder / oci.build_blob_name(b.digest)
            out[b.digest].write_bytes(self.blobs[b.digest])
        return out


def _dir_layer(tmp_path: Path, names: list[str]) -> bytes:
    path = _tar(tmp_path / f"layer-{len(names)}.tar.gz", [(n, "file", b"x") for n in names])
    return path.read_bytes()


@pytest.mark.parametrize(("title", "names", "message"), [
    ("digits", ["digits/a", "model.bin"], "holds digits, model.bin at its top"),
    ("digits", ["other/a"], "holds other at its top"),
    ("digits", ["digits/../../x"], "'..' in path"),
], ids=["beside-its-title", "another-name", "traversal"])
def test_a_directory_layer_writes_under_its_title_only(tmp_path: Path, title: str, names: list[str],
                                                       message: str) -> None:
    data = _dir_layer(tmp_path, names)
    layer = oci.Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", D, len(data),
                           {oci.TITLE: title, oci.UNPACK: "true"})
    resolved = oci.Resolved(D, {}, "artifact", (layer,))
    root, model = tmp_path / "root", tmp_path / "root" / "model"
    model.mkdir(parents=True)
    with pytest.raises(ArchiveError, match=message):
        oci.materialize(_StubClient({D: data}), resolved, root, model, None,  # type: ignore[arg-type]
                        Progress("oci://r/m:v1"), max_bytes=1 << 30, max_ratio=0, cancel=threading.Event())
    assert not any(model.iterdir())


def test_an_artifact_file_is_a_known_blob_and_a_directory_is_not(tmp_path: Path) -> None:
    data = _dir_layer(tmp_path, ["digits/a"])
    d2 = "sha256:" + "b" * 64
    layers = (oci.Descriptor("application/octet-stream", D, 1, {oci.TITLE: "model.bin"}),
              oci.Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", d2, len(data),
                             {oci.TITLE: "digits", oci.UNPACK: "true"}))
    root, model = tmp_path / "root", tmp_path / "root" / "model"
    model.mkdir(parents=True)
    done = oci.materialize(_StubClient({D: b"w", d2: data}),  # type: ignore[arg-type]
                           oci.Resolved(D, {}, "artifact", layers), root, model, None, Progress("oci://r/m:v1"),
                           max_bytes=1 << 30, max_ratio=0, cancel=threading.Event())
    assert done.known == {"model.bin": (H, 1)}
    assert done.downloaded == 1 + len(data)
    assert _tree(model) == {"digits": "dir", "digits/a": "x", "model.bin": "w"}
