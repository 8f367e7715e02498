"""Text in: the manifest's tokenizer declaration, BYTES inputs over REST JSON, the binary extension and gRPC, the
OpenAI-compatible `POST /v1/embeddings` (with the official `openai` client), the gRPC health service, and --http off.

Pure parts are table-driven; the server parts run the real `shipyard-runtime serve` in its own process on a small
MiniLM (one layer, untrained) saved with the packaged MiniLM tokenizer.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import hypothesis
import hypothesis.strategies as st
import numpy as np
import openai
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from shipyard.runtime import datasets, models, oip, openaiproto, textinput
from shipyard.runtime.artifacts import ArtifactError, manifests, store
from shipyard.runtime.server import settings
from tests import serverproc

MODEL = "minilm-text"
TOKEN_INPUTS = (
    manifests.TensorSpec("input_ids", "INT64", (-1, -1)),
    manifests.TensorSpec("attention_mask", "INT64", (-1, -1)),
)
DECLARATION = {"file": "tokenizer.json", "text": "text", "maxLength": 64,
               "inputs": {"ids": "input_ids", "mask": "attention_mask"}}
SENTENCES = ["A red fox crossed the frozen lake.", "Hello", "The honey bees pollinated the wild flowers at dusk."]


# ------------------------------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (DECLARATION, None),
        ({**DECLARATION, "file": "../tokenizer.json"}, "tokenizer.file"),
        ({**DECLARATION, "maxLength": 1}, "tokenizer.maxLength"),
        ({**DECLARATION, "maxLength": True}, "tokenizer.maxLength"),
        ({**DECLARATION, "text": "input_ids"}, "already a declared input"),
        ({**DECLARATION, "inputs": {"mask": "attention_mask"}}, "tokenizer.inputs"),
        ({**DECLARATION, "inputs": {"ids": "nope"}}, "tokenizer.inputs.ids: 'nope'"),
        ({**DECLARATION, "inputs": {"ids": "input_ids", "mask": "input_ids"}}, "takes two roles"),
        ({**DECLARATION, "inputs": {"ids": "input_ids", "segment": "attention_mask"}}, "unknown role"),
        ({**DECLARATION, "padId": -1}, "tokenizer.padId"),
        ({**DECLARATION, "vocab": 3}, "unknown field"),
        ("tokenizer.json", "tokenizer: must be"),
    ],
)
def test_tokenizer_declaration(raw: Any, error: str | None) -> None:
    if error is None:
        spec = manifests.build_tokenizer_spec(raw, TOKEN_INPUTS)
        assert spec is not None and spec.fed_inputs == ("input_ids", "attention_mask") and spec.max_length == 64
        assert manifests.build_tokenizer_spec(spec.to_dict(), TOKEN_INPUTS) == spec
    else:
        with pytest.raises(ArtifactError, match=re.escape(error)):
            manifests.build_tokenizer_spec(raw, TOKEN_INPUTS)


def test_tokenizer_inputs_must_be_integer_sequences() -> None:
    inputs = (manifests.TensorSpec("input_ids", "FP32", (-1, -1)),)
    with pytest.raises(ArtifactError, match="must be INT32 or INT64"):
        manifests.build_tokenizer_spec({**DECLARATION, "inputs": {"ids": "input_ids"}}, inputs)


def test_manifest_lists_the_tokenizer_file() -> None:
    manifest = {"format": 1, "name": "m", "kind": "factory", "factory": "a.b:c", "weights": "w.safetensors",
                "inputs": [s.to_dict() for s in TOKEN_INPUTS],
                "outputs": [{"name": "e", "datatype": "FP32", "shape": [-1, 4]}], "tokenizer": DECLARATION,
                "files": {"w.safetensors": {"sha256": "0", "bytes": 1}}}
    assert any("tokenizer file 'tokenizer.json'" in p for p in manifests.assess_manifest(manifest))


@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        ([b"caf\xc3\xa9", "str"], ["café", "str"]),
        ([b"ok", b"\xff\xfe"], "element 1 is not valid UTF-8"),
        ([b"\xc3"], "element 0 is not valid UTF-8"),
    ],
)
def test_build_texts(elements: list[Any], expected: Any) -> None:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    if isinstance(expected, list):
        assert textinput.build_texts(array, "text") == expected
    else:
        with pytest.raises(oip.BadRequest, match=f"input 'text': {expected}"):
            textinput.build_texts(array, "text")


@pytest.mark.parametrize(
    ("lengths", "pad", "length", "expected_width"),
    [([2, 4], 0, None, 4), ([3, 3], 7, None, 3), ([1], 0, 5, 5), ([2, 5, 1], 9, None, 5)],
)
def test_build_padded_batch(lengths: list[int], pad: int, length: int | None, expected_width: int) -> None:
    arrays = [np.full((2, n), i + 1, dtype=np.int64) for i, n in enumerate(lengths)]
    batch = textinput.build_padded_batch(arrays, pad, length)
    assert batch.shape == (2 * len(lengths), expected_width)
    for i, n in enumerate(lengths):
        rows = batch[2 * i : 2 * i + 2]
        assert (rows[:, :n] == i + 1).all() and (rows[:, n:] == pad).all()


@pytest.mark.parametrize(
    ("item", "error"),
    [
        ({"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}, None),
        ({"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}, "1 data elements do not fill"),
        ({"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", 3]}, "element 1 must be a string"),
        ({"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["a"]}, "rank 2"),
    ],
)
def test_json_bytes_input(item: dict[str, Any], error: str | None) -> None:
    spec = textinput.TextSpec("text")
    if error is None:
        assert oip.build_array(item, spec).tolist() == ["a", "b"]
    else:
        with pytest.raises(oip.BadRequest, match=re.escape(error)):
            oip.build_array(item, spec)


@pytest.mark.parametrize(
    ("buffer", "count", "error"),
    [
        (oip.build_bytes_buffer([b"ab", b"c"]), 2, None),
        (b"\x05\x00\x00\x00ab", 1, "BYTES element 0 is 5 bytes long, only 2 remain"),
        (b"\xff\xff\xff\xffab", 1, "is 4294967295 bytes long"),
        (b"\x01\x00", 1, "ends before element 0's 4-byte length"),
        (oip.build_bytes_buffer([b"ab"]) + b"x", 1, "1 bytes are left"),
    ],
)
def test_bytes_length_prefix(buffer: bytes, count: int, error: str | None) -> None:
    if error is None:
        assert oip.build_bytes_elements(buffer, count, "text") == [b"ab", b"c"]
    else:
        with pytest.raises(oip.BadRequest, match=re.escape(error)):
            oip.build_bytes_elements(buffer, count, "text")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "m", "input": "hi"}, (["hi"], None, "float", None)),
        ({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}, (["a", "b"], None, "base64", None)),
        ({"model": "m", "input": [1, 2, 3]}, (None, [[1, 2, 3]], "float", None)),
        ({"model": "m", "input": [[1], [2, 3]], "dimensions": 8}, (None, [[1], [2, 3]], "float", 8)),
        ({"input": "hi"}, "'model'"),
        ({"model": "m", "input": []}, "'input'"),
        ({"model": "m", "input": ["a", 1]}, "'input'[0]"),
        ({"model": "m", "input": [[-1]]}, "'input'[0]"),
        ({"model": "m", "input": "a", "encoding_format": "int8"}, "'encoding_format'"),
        ({"model": "m", "input": "a", "dimensions": 0}, "'dimensions'"),
        ([1], "JSON object"),
    ],
)
def test_embeddings_request(body: Any, expected: Any) -> None:
    raw = json.dumps(body).encode()
    if isinstance(expected, tuple):
        parsed = openaiproto.build_embeddings_request(raw)
        assert (parsed.texts, parsed.token_ids, parsed.encoding_format, parsed.dimensions) == expected
    else:
        with pytest.raises(openaiproto.OpenAIError, match=re.escape(expected)) as caught:
            openaiproto.build_embeddings_request(raw)
        assert caught.value.status == 400


def test_embeddings_response_shortens_and_encodes() -> None:
    vectors = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    document = json.loads(openaiproto.build_embeddings_response("m", vectors, "base64", 2, 7))
    assert document["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    first = np.frombuffer(base64.b64decode(document["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(first, [0.6, 0.8], rtol=1e-6)
    with pytest.raises(openaiproto.OpenAIError, match="has 3"):
        openaiproto.build_embeddings_response("m", vectors, "float", 4, 7)


@pytest.mark.parametrize(
    ("has_text", "outputs", "problem"),
    [
        (True, [manifests.TensorSpec("e", "FP32", (-1, 8))], None),
        (False, [manifests.TensorSpec("e", "FP32", (-1, 8))], "no tokenizer"),
        (True, [manifests.TensorSpec("e", "INT64", (-1, 8))], "floating output"),
        (True, [manifests.TensorSpec("e", "FP32", (-1, -1, 8))], "floating output"),
        (True, [manifests.TensorSpec("a", "FP32", (-1, 8)), manifests.TensorSpec("b", "FP32", (-1, 8))], "2 outputs"),
    ],
)
def test_assess_embedding_model(has_text: bool, outputs: list[Any], problem: str | None) -> None:
    found = openaiproto.assess_embedding_model(has_text, outputs)
    assert found == problem if problem is None else problem in (found or "")


@pytest.mark.parametrize(
    ("argv", "env", "http", "error"),
    [
        ([], {}, True, None),
        (["--http", "off", "--grpc-port", "0"], {}, False, None),
        (["--grpc-port", "0"], {"SHIPYARD_HTTP": "off"}, False, None),
        (["--http", "on", "--grpc-port", "0"], {"SHIPYARD_HTTP": "off"}, True, None),
        (["--http", "off"], {}, None, "--http off needs --grpc-port"),
        ([], {"SHIPYARD_HTTP": "maybe"}, None, "SHIPYARD_HTTP"),
    ],
)
def test_http_off_setting(argv: list[str], env: dict[str, str], http: bool | None, error: str | None) -> None:
    args = ["--artifact", "/m", *argv]
    if error is None:
        assert settings.build_config(args, env).http is http
    else:
        with pytest.raises(settings.ConfigError, match=re.escape(error)):
            settings.build_config(args, env)


def test_text_requests_batch_padded_to_the_longest() -> None:
    from tokenizers import Tokenizer

    from shipyard.runtime import batching, engine

    spec = manifests.build_tokenizer_spec(DECLARATION, TOKEN_INPUTS)
    assert spec is not None
    tokenizer = Tokenizer.from_file(str(models.query_minilm_dir() / "tokenizer.json"))
    text = textinput.TextInput(spec, tokenizer, TOKEN_INPUTS)
    short, _ = text.build_model_request(["Hi"], [])
    long, tokens = text.build_model_request([SENTENCES[2]], [])
    assert short.key == long.key and tokens == long.arrays[0].shape[1]
    ids, mask = datasets.build_token_batch(["Hi", SENTENCES[2]])
    batch = engine.build_batch_arrays([short.arrays, long.arrays], short.pad_values or ())
    np.testing.assert_array_equal(batch[0], ids.numpy())
    np.testing.assert_array_equal(batch[1], mask.numpy())
    assert batching.plan_batch([batching.Job(short), batching.Job(long)], 8) == (2, 2)


# ----------------------------------------------------------------------------------------------- server


@dataclass
class Served:
    process: subprocess.Popen[str]
    http_port: int | None
    grpc_port: int
    log: list[str]
    module: torch.nn.Module


def _start(path: Path, extra: list[str], wait_ready: bool = True) -> Served:
    server = serverproc.start_server(
        ["--artifact", str(path), "--host", "127.0.0.1", "--model-name", MODEL, "--threads", "1",
         "--drain-propagation-s", "0", "--warmup-iterations", "1", "--max-batch-size", "4", "--batch-sizing", "max",
         "--grpc-port", "0", *extra], env={"TOKENIZERS_PARALLELISM": "false"})
    assert server.listening.wait(180), server.output()
    if wait_ready:
        assert server.ready.wait(300) and server.process.poll() is None, server.output()
    return Served(server.process, server.ports.get("http"), server.ports["grpc"], server.log, torch.nn.Identity())


def _stop(served: Served) -> None:
    serverproc.ServerProcess(served.process).stop()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    module = models.build_minilm_encoder(num_hidden_layers=1).eval()
    path = tmp_path_factory.mktemp("text") / MODEL
    store.save_model(module, path, name=MODEL, factory="shipyard.runtime.models:build_minilm_encoder",
                     factory_kwargs={"num_hidden_layers": 1}, inputs=[s.to_dict() for s in TOKEN_INPUTS],
                     outputs=[{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
                     tokenizer=DECLARATION, tokenizer_source=models.query_minilm_dir() / "tokenizer.json")
    return path, module


@pytest.fixture(scope="module")
def served(text_model: tuple[Path, torch.nn.Module]) -> Iterator[Served]:
    path, module = text_model
    served = _start(path, ["--port", "0"])
    served.module = module
    try:
        yield served
    finally:
        _stop(served)


def _expected(module: torch.nn.Module, sentences: list[str]) -> np.ndarray:
    ids, mask = datasets.build_token_batch(sentences)
    with torch.inference_mode():
        result: np.ndarray = module(ids, mask).numpy()
    return result


def test_metadata_lists_the_text_input(served: Served) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    metadata = client.get_model_metadata(MODEL)
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("input_ids", "INT64", [-1, -1]), ("attention_mask", "INT64", [-1, -1]), ("text", "BYTES", [-1])]
    client.close()


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_text(served: Served, binary: bool) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.http_port}", network_timeout=60)
    tensor = triton_http.InferInput("text", [len(SENTENCES)], "BYTES")
    tensor.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=object), binary_data=binary)
    result = client.infer(MODEL, [tensor], outputs=[triton_http.InferRequestedOutput("embedding", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("embedding"), _expected(served.module, SENTENCES), atol=1e-5)
    client.close()


def test_token_ids_are_still_accepted(served: Served) -> None:
    ids, mask = datasets.build_token_batch(SENTENCES)
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.http_port}", network_timeout=60)
    inputs = [triton_http.InferInput("input_ids", list(ids.shape), "INT64"),
              triton_http.InferInput("attention_mask", list(mask.shape), "INT64")]
    inputs[0].set_data_from_numpy(ids.numpy())
    inputs[1].set_data_from_numpy(mask.numpy())
    result = client.infer(MODEL, inputs)
    np.testing.assert_allclose(result.as_numpy("embedding"), _expected(served.module, SENTENCES), atol=1e-5)
    client.close()


def _post(port: int | None, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    assert port is not None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body, headers)
    response = connection.getresponse()
    answer = response.status, response.read()
    connection.close()
    return answer


def test_invalid_utf8_is_400_naming_the_input(served: Served) -> None:
    data = oip.build_bytes_buffer([b"fine", b"\xff\xfe bad"])
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    status, body = _post(served.http_port, f"/v2/models/{MODEL}/infer", header + data,
                         {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and b"input 'text': element 1 is not valid UTF-8" in body
    overrun = b"\x50\x00\x00\x00ab"
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(overrun)}}]}).encode()
    status, body = _post(served.http_port, f"/v2/models/{MODEL}/infer", header + overrun,
                         {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and b"BYTES element 0 is 80 bytes long" in body


@pytest.mark.parametrize("typed", [False, True])
def test_tritonclient_grpc_text(served: Served, typed: bool) -> None:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    if typed:  # bytes_contents, as a client that does not use raw_input_contents sends them
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        item = request.inputs.add(name="text", datatype="BYTES", shape=[len(SENTENCES)])
        item.contents.bytes_contents.extend(s.encode() for s in SENTENCES)
        response = stub.ModelInfer(request, timeout=60)
        got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(len(SENTENCES), 384)
        bad = service_pb2.ModelInferRequest(model_name=MODEL)
        bad.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"\xc3")
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(bad, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'text': element 0 is not valid UTF-8" in (caught.value.details() or "")
        channel.close()
    else:
        tensor = triton_grpc.InferInput("text", [len(SENTENCES)], "BYTES")
        tensor.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=object))
        got = client.infer(MODEL, [tensor]).as_numpy("embedding")
        bad = triton_grpc.InferInput("text", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"\xff"], dtype=object))
        with pytest.raises(InferenceServerException, match="not valid UTF-8"):
            client.infer(MODEL, [bad])
    np.testing.assert_allclose(got, _expected(served.module, SENTENCES), atol=1e-5)
    client.close()


def test_openai_client_embeddings(served: Served) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    expected = _expected(served.module, SENTENCES)
    result = client.embeddings.create(model=MODEL, input=SENTENCES)
    assert [item.index for item in result.data] == [0, 1, 2] and result.model == MODEL
    np.testing.assert_allclose(np.array([item.embedding for item in result.data]), expected, atol=1e-5)
    ids, _ = datasets.build_token_batch(SENTENCES)
    assert result.usage.prompt_tokens == result.usage.total_tokens == int((ids != 0).sum())
    encoded = client.embeddings.create(model=MODEL, input="Hello", encoding_format="base64")
    vector = encoded.data[0].embedding  # asked for base64 itself, the client hands the string over as it came
    assert isinstance(vector, str)
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(vector), dtype="<f4"), expected[1], atol=1e-5)
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="other", input="Hello")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="Hello", dimensions=1000)
    client.close()
    metrics = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=30)
    metrics.request("GET", "/metrics")
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in metrics.getresponse().read().decode().splitlines() if line.startswith("shipyard_requests")}
    metrics.close()
    counted = {labels: value for labels, value in samples.items() if 'protocol="openai"' in labels}
    assert sum(v for k, v in counted.items() if 'code="200"' in k) >= 2  # the float and the base64 request
    assert sum(v for k, v in counted.items() if 'code="404"' in k) >= 1
    assert sum(v for k, v in counted.items() if 'code="400"' in k) >= 1


def test_grpc_health_service(served: Served) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_embeddings_404_for_a_model_without_text(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = models.build_digits_mlp(hidden=(8,)).eval()
    path = tmp_path / "digits"
    store.save_model(module, path, name="digits", factory="shipyard.runtime.models:build_digits_mlp",
                     factory_kwargs={"hidden": [8]}, inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
                     outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}])
    served = _start(path, ["--http", "off"])  # and gRPC alone serves
    try:
        assert served.http_port is None
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
        assert client.is_server_ready()
        tensor = triton_grpc.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
        assert client.infer(MODEL, [tensor]).as_numpy("logits").shape == (1, 10)
        client.close()
    finally:
        _stop(served)
    served = _start(path, ["--port", "0"])
    try:
        status, body = _post(served.http_port, "/v1/embeddings", json.dumps({"model": MODEL, "input": "x"}).encode(),
                             {"Content-Type": "application/json"})
        error = json.loads(body)["error"]
        assert status == 404 and error["code"] == "model_not_found" and "no tokenizer" in error["message"]
    finally:
        _stop(served)


def test_tokenizer_that_does_not_load_fails_the_start(text_model: tuple[Path, torch.nn.Module],
                                                      tmp_path: Path) -> None:
    source, _ = text_model
    broken = tmp_path / "broken"
    module = models.build_minilm_encoder(num_hidden_layers=1).eval()
    bad = tmp_path / "bad-tokenizer.json"
    bad.write_text('{"version": "1.0", "model": "not a tokenizer"}')
    store.save_model(module, broken, name=MODEL, factory="shipyard.runtime.models:build_minilm_encoder",
                     factory_kwargs={"num_hidden_layers": 1}, inputs=[s.to_dict() for s in TOKEN_INPUTS],
                     outputs=[{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
                     tokenizer=DECLARATION, tokenizer_source=bad)
    served = _start(broken, ["--port", "0"], wait_ready=False)
    try:
        assert served.process.wait(300) == 1
        text = "\n".join(served.log)
        assert "Became ready" not in text
        assert f"tokenizer file {broken.resolve() / 'tokenizer.json'}: cannot be loaded" in text
    finally:
        _stop(served)
    assert source.exists()


def test_live_evaluation_feeds_token_ids_to_a_text_model(served: Served) -> None:
    """The canary's live evaluation (gate datasets of token ids) leaves the BYTES text input out of the metadata."""
    from shipyard import contract
    from shipyard.runtime import liveeval

    url = f"http://127.0.0.1:{served.http_port}"
    config = liveeval.EvalConfig(url=url, model=MODEL, dataset="builtin:sentence-fidelity", samples=64,
                                 batch_size=16, reference_url=url, retries=1, termination_log=None,
                                 minimums=(("cosine", 0.999),))
    outcome = liveeval.run_evaluation(config)
    assert outcome.code == contract.EXIT_MEASURED, outcome.line


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}, {"name": "text", "datatype": "BYTES",
                                                                          "shape": [-1]}],
         ["input_ids"]),
        ([{"name": "text", "datatype": "BYTES", "shape": [-1]}], ["text"]),  # nothing but text: left for the check
    ],
)
def test_live_evaluation_metadata_without_text(inputs: list[dict[str, Any]], expected: list[str]) -> None:
    from shipyard.runtime import liveeval

    kept = liveeval.build_tensor_metadata({"name": "m", "inputs": inputs})
    assert [spec["name"] for spec in kept["inputs"]] == expected


def test_tokenizer_file_is_in_the_digest_and_verified(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = models.build_digits_mlp(hidden=(8,)).eval()
    inputs = [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}]
    source = tmp_path / "tokenizer-source.json"
    source.write_text((models.query_minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"), encoding="utf-8")
    declaration = {"file": "tokenizer.json", "maxLength": 16, "inputs": {"ids": "input_ids"}}
    path = tmp_path / "model"
    kwargs: dict[str, Any] = {"name": "m", "factory": "shipyard.runtime.models:build_digits_mlp",
                              "factory_kwargs": {"hidden": [8]}, "inputs": inputs,
                              "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}
    manifest = store.save_model(module, path, tokenizer=declaration, tokenizer_source=source, **kwargs)
    assert "tokenizer.json" in manifest["files"] and manifest["tokenizer"]["text"] == "text"
    assert manifests.load_verified_manifest(path)["digest"] == manifest["digest"]
    (path / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ArtifactError, match="digest mismatch: tokenizer.json"):
        manifests.load_verified_manifest(path)
    with pytest.raises(ArtifactError, match="tokenizer file .* is missing"):
        store.save_model(module, tmp_path / "other", tokenizer=declaration, tokenizer_source=tmp_path / "nope",
                         **kwargs)


def test_a_compressed_text_model_keeps_its_tokenizer(text_model: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    """The compression Job carries the tokenizer file and declaration into the artifact (the gate still feeds ids)."""
    from shipyard.runtime import cli

    source, _ = text_model
    config = {"source": str(source), "output": str(tmp_path / "out"),
              "steps": [{"quantize": {"scheme": "int8-dynamic"}}],
              "evaluation": {"dataset": "builtin:sentence-fidelity", "maxRelativeAccuracyLoss": 0.05},
              "terminationLog": str(tmp_path / "termination-log"),
              "latency": {"batchSizes": [1], "budgetSeconds": 0.02}, "compiled": {"mode": "off"}}
    (tmp_path / "compression.json").write_text(json.dumps(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["compress", "--config", str(tmp_path / "compression.json")]) == 0, (
            (tmp_path / "termination-log").read_text())
    finally:
        torch.set_num_threads(threads)
    manifest = manifests.load_verified_manifest(tmp_path / "out")
    assert manifest["tokenizer"] == manifests.load_manifest(source)["tokenizer"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    loaded = store.load_model(tmp_path / "out")
    text = textinput.load_text_input(loaded)
    assert text is not None and [s.name for s in text.served_inputs] == ["input_ids", "attention_mask", "text"]



# ------------------------------------------------------------------------------------------------------ fuzz
# Hostile text requests: the parsers raise BadRequest and nothing else (generated inputs), and the server over gRPC
# answers every generated bad message INVALID_ARGUMENT (never INTERNAL/UNKNOWN), valid ones correctly, and keeps
# serving. (tests/integration/test_server_fuzz.py fuzzes REST at length; these cover the text and gRPC paths.)

_TEXT: list[textinput.TextInput] = []
OUTPUTS = [manifests.TensorSpec("embedding", "FP32", (-1, 384))]


def _text_input() -> textinput.TextInput:
    if not _TEXT:
        from tokenizers import Tokenizer

        spec = manifests.build_tokenizer_spec(DECLARATION, TOKEN_INPUTS)
        assert spec is not None
        tokenizer = Tokenizer.from_file(str(models.query_minilm_dir() / "tokenizer.json"))
        _TEXT.append(textinput.TextInput(spec, tokenizer, TOKEN_INPUTS))
    return _TEXT[0]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(buffer=st.binary(max_size=64), count=st.integers(0, 8))
def test_fuzz_bytes_framing(buffer: bytes, count: int) -> None:
    try:
        elements = oip.build_bytes_elements(buffer, count, "text")
    except oip.BadRequest as error:
        assert "input 'text'" in str(error)
    else:
        assert len(elements) == count and oip.build_bytes_buffer(elements) == buffer


_ELEMENTS = st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40)), min_size=1, max_size=4)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(elements=_ELEMENTS, shape=st.lists(st.integers(-2, 6), max_size=2), name=st.sampled_from(
    ["text", "input_ids", "Text"]), datatype=st.sampled_from(["BYTES", "INT64", "FP32"]), binary=st.booleans(),
    cut=st.integers(-3, 3), lie=st.integers(-8, 8))
def test_fuzz_text_requests_raise_only_bad_request(elements: list[Any], shape: list[int], name: str, datatype: str,
                                                   binary: bool, cut: int, lie: int) -> None:
    """Generated REST text requests (JSON and binary, framing cut and header lengths lied about) either parse into
    a request of the model's inputs or raise BadRequest."""
    text = _text_input()
    item: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape or [len(elements)]}
    header_length: bytes | None = None
    if binary:
        raw = oip.build_bytes_buffer([e if isinstance(e, bytes) else e.encode() for e in elements])
        raw = raw[: len(raw) + cut] if cut < 0 else raw + b"\x00" * cut
        item["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps({"inputs": [item]}).encode()
        body = head + raw
        header_length = b"%d" % max(0, len(head) + lie)
    else:
        item["data"] = [e.decode("latin-1") if isinstance(e, bytes) else e for e in elements]
        body = json.dumps({"inputs": [item]}).encode()
    try:
        parsed = text.build_infer_request(body, header_length, OUTPUTS)
    except oip.BadRequest:
        return
    assert len(parsed.arrays) == len(TOKEN_INPUTS) and parsed.rows == parsed.arrays[0].shape[0]


def _grpc_probe(rng: Any, index: int) -> tuple[Any, bool]:
    """A generated ModelInferRequest for the text model, and whether it is valid."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=MODEL, id=f"f{index}")
    texts = [rng.choice(SENTENCES).encode() for _ in range(rng.randint(1, 3))]
    mutation = rng.randrange(12)
    item = request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    if mutation == 0:  # valid, raw
        request.raw_input_contents.append(oip.build_bytes_buffer(texts))
        return request, True
    if mutation == 1:  # valid, typed
        item.contents.bytes_contents.extend(texts)
        return request, True
    if mutation == 2:  # invalid UTF-8
        texts[rng.randrange(len(texts))] = rng.choice([b"\xff", b"\xc3", b"ok\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        request.raw_input_contents.append(oip.build_bytes_buffer(texts))
    elif mutation == 3:  # a length prefix overrunning the buffer
        raw = oip.build_bytes_buffer(texts)
        request.raw_input_contents.append(struct_pack_first_length(raw, rng.choice([10**6, 2**32 - 1, len(raw)])))
    elif mutation == 4:  # truncated or padded framing
        raw = oip.build_bytes_buffer(texts)
        request.raw_input_contents.append(raw[: rng.randrange(len(raw))] if rng.random() < 0.5 else raw + b"\x01")
    elif mutation == 5:  # a count of elements that does not fill the shape
        item.contents.bytes_contents.extend(texts + [b"extra"])
    elif mutation == 6:
        del item.shape[:]
        item.shape.extend(rng.choice([[len(texts), 1], [], [0], [-1]]))
        request.raw_input_contents.append(oip.build_bytes_buffer(texts))
    elif mutation == 7:
        item.datatype = rng.choice(["INT64", "FP32", "bytes", ""])
        request.raw_input_contents.append(oip.build_bytes_buffer(texts))
    elif mutation == 8:  # both forms
        item.contents.bytes_contents.extend(texts)
        request.raw_input_contents.append(oip.build_bytes_buffer(texts))
    elif mutation == 9:  # text and token ids mixed
        request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2])
        request.raw_input_contents.extend([oip.build_bytes_buffer(texts), b"\x00" * 16])
    elif mutation == 10:  # junk where the raw contents go
        request.raw_input_contents.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))))
    else:  # an unknown output
        item.contents.bytes_contents.extend(texts)
        request.outputs.add(name="nope")
    return request, False


def struct_pack_first_length(raw: bytes, length: int) -> bytes:
    """`raw` with its first BYTES element's 4-byte length replaced by `length`."""
    import struct

    return struct.pack("<I", length) + raw[4:]


def test_fuzz_grpc_text_requests(served: Served) -> None:
    """Seeded hostile ModelInfer messages over gRPC: INVALID_ARGUMENT for the bad (never INTERNAL), the right
    embeddings for the valid, garbage bytes refused, and the server still ready at the end."""
    import random

    from tritonclient.grpc import service_pb2, service_pb2_grpc

    rng = random.Random(20261202)
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    codes: dict[str, int] = {}
    for index in range(150):
        if index % 25 == 24:  # bytes that are no message at all
            with pytest.raises(grpc.RpcError) as caught:
                garbage(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) + b"\xff\xff", timeout=60)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            continue
        request, valid = _grpc_probe(rng, index)
        try:
            response = stub.ModelInfer(request, timeout=60)
        except grpc.RpcError as error:
            codes[error.code().name] = codes.get(error.code().name, 0) + 1
            assert not valid and error.code() == grpc.StatusCode.INVALID_ARGUMENT, (index, error.details())
            continue
        assert valid, index
        rows = request.inputs[0].shape[0]
        got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(rows, 384)
        texts = (list(request.inputs[0].contents.bytes_contents) if not request.raw_input_contents
                 else oip.build_bytes_elements(request.raw_input_contents[0], rows))
        np.testing.assert_allclose(got, _expected(served.module, [t.decode() for t in texts]), atol=1e-5)
    assert codes.get("INVALID_ARGUMENT", 0) > 50, codes
    assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(service_pb2.ServerReadyRequest()).ready
    channel.close()


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"id": "text", "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 102]},
                                   {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]}]},
         (1, 2)),  # the text input's name in the id: still a token-id request
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["Hi", "A red fox."]}]}, (2, 6)),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["Hi"]}]},
         "input 'text': shape [1, 1] has rank 2"),  # the text request's own error
    ],
)
def test_text_or_token_request(document: dict[str, Any], expected: Any) -> None:
    text = _text_input()
    body = json.dumps(document).encode()
    if isinstance(expected, tuple):
        parsed = text.build_infer_request(body, None, OUTPUTS)
        assert parsed.arrays[0].shape == expected and len(parsed.arrays) == 2
    else:
        with pytest.raises(oip.BadRequest, match=re.escape(expected)):
            text.build_infer_request(body, None, OUTPUTS)


def test_the_compiled_package_takes_tokenized_text(tmp_path: Path) -> None:
    """The AOTInductor package's sequence axis is dynamic: tokenized batches of any length (2 at least: [CLS] [SEP],
    and token-id lists are padded to 2) run through it and match the eager model. About a minute on 2 cores."""
    torch.manual_seed(0)
    module = models.build_minilm_encoder(num_hidden_layers=1).eval()
    path = tmp_path / "compiled"
    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with store.stage_directory(path) as staging:
            store.write_model_files(
                staging, module, name=MODEL, factory="shipyard.runtime.models:build_minilm_encoder",
                factory_kwargs={"num_hidden_layers": 1}, inputs=[s.to_dict() for s in TOKEN_INPUTS],
                outputs=[{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}], tokenizer=DECLARATION,
                tokenizer_source=models.query_minilm_dir() / "tokenizer.json", compile_inputs=example,
                compile_max_batch=8)
        compiled = store.load_model(path, compiled=True)
        text = textinput.load_text_input(compiled)
        assert text is not None
        requests = [text.build_model_request(texts, [])[0] for texts in (["", "Hi"], [SENTENCES[2]] * 3)]
        requests.append(text.build_token_request([[101]])[0])
        for request in requests:
            tensors = [torch.from_numpy(array) for array in request.arrays]
            with torch.inference_mode():
                torch.testing.assert_close(compiled.module(*tensors), module(*tensors), rtol=1e-4, atol=1e-5)
        assert [r.arrays[0].shape[1] for r in requests] == [3, 13, 2]
    finally:
        torch.set_num_threads(threads)
