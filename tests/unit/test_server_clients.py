"""Client conformance: Triton's own Python clients (tritonclient, which speaks KServe's V2 protocol) against the real
`shipyard-runtime serve` in its own process, serving a real model directory (store.save_model), over REST and gRPC.

REST: health, readiness, server and model metadata, inference with JSON tensors and with the binary tensor data
extension (inputs, outputs, both, and the binary outputs tritonclient asks for when no output is named), and a bad
shape answered 400 with the server still serving. gRPC (inference.GRPCInferenceService on --grpc-port): the same
calls with raw_input_contents/raw_output_contents, typed contents, INVALID_ARGUMENT for a bad shape,
RESOURCE_EXHAUSTED for a message over the payload limit, garbage INVALID_ARGUMENT, and the requests counted with
protocol="grpc". Then tritonclient's asyncio clients (REST and gRPC) with many requests in flight. Starts a
subprocess listening on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_grpc_aio
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from shipyard.runtime import models
from shipyard.runtime.artifacts import store
from tests import serverproc

MODEL = "digits"
VERSION = "1.4.0"
MAX_PAYLOAD = 1024 * 1024  # --max-payload-bytes: 413 over REST, RESOURCE_EXHAUSTED over gRPC


@dataclass
class Served:
    process: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    log: list[str]
    module: torch.nn.Module

    def expected(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            result: np.ndarray = self.module(torch.from_numpy(pixels)).numpy()
            return result


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    torch.manual_seed(0)
    module = models.build_digits_mlp(hidden=(32, 16)).eval()
    path = tmp_path_factory.mktemp("clients") / MODEL
    store.save_model(module, path, name=MODEL, factory="shipyard.runtime.models:build_digits_mlp",
                     factory_kwargs={"hidden": [32, 16]},
                     inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
                     outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}])
    server = serverproc.start_server(
        ["--artifact", str(path), "--host", "127.0.0.1", "--port", "0", "--model-version", VERSION, "--threads", "1",
         "--drain-propagation-s", "0", "--warmup-iterations", "1", "--grpc-port", "0",
         "--max-payload-bytes", str(MAX_PAYLOAD)])
    try:
        assert server.listening.wait(120), server.output()
        served = Served(server.process, server.ports["http"], server.ports["grpc"], server.log, module)
        client = triton_http.InferenceServerClient(f"127.0.0.1:{served.http_port}")
        deadline = time.monotonic() + 120
        while not client.is_server_ready():
            assert server.process.poll() is None and time.monotonic() < deadline, server.output()
            time.sleep(0.05)
        client.close()
        yield served
    finally:
        server.stop()


@pytest.fixture
def client(served: Served) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.http_port}", network_timeout=30)
    yield client
    client.close()


PIXELS = (np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17) / 16


def test_health_and_readiness(client: triton_http.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, VERSION)
    assert not client.is_model_ready("other")


def test_server_and_model_metadata(client: triton_http.InferenceServerClient) -> None:
    server = client.get_server_metadata()
    assert server["name"] == "shipyard" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == [VERSION]
    assert model["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata(MODEL, VERSION)["name"] == MODEL


ENCODINGS = [
    pytest.param(False, False, id="json-in-json-out"),
    pytest.param(True, False, id="binary-in-json-out"),
    pytest.param(False, True, id="json-in-binary-out"),
    pytest.param(True, True, id="binary-in-binary-out"),
]


@pytest.mark.parametrize(("binary_input", "binary_output"), ENCODINGS)
def test_infer(served: Served, client: triton_http.InferenceServerClient, binary_input: bool,
               binary_output: bool) -> None:
    pixels = triton_http.InferInput("pixels", list(PIXELS.shape), "FP32")
    pixels.set_data_from_numpy(PIXELS, binary_data=binary_input)
    logits = triton_http.InferRequestedOutput("logits", binary_data=binary_output)
    result = client.infer(MODEL, [pixels], outputs=[logits], request_id="c1")
    got = result.as_numpy("logits")
    assert got is not None and got.dtype == np.float32 and got.shape == (3, 10)
    np.testing.assert_allclose(got, served.expected(PIXELS), rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert response["id"] == "c1" and response["model_version"] == VERSION
    assert ("parameters" in response["outputs"][0]) == binary_output  # binary_data_size instead of data


def test_infer_without_named_outputs_gets_every_output_as_binary(served: Served,
                                                                   client: triton_http.InferenceServerClient) -> None:
    pixels = triton_http.InferInput("pixels", [1, 64], "FP32")
    pixels.set_data_from_numpy(PIXELS[:1], binary_data=True)
    result = client.infer(MODEL, [pixels], model_version=VERSION)  # tritonclient sets binary_data_output
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 40
    np.testing.assert_allclose(result.as_numpy("logits"), served.expected(PIXELS[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("binary_input", [False, True], ids=["json", "binary"])
def test_a_bad_shape_is_400_and_the_server_keeps_serving(served: Served, client: triton_http.InferenceServerClient,
                                                         binary_input: bool) -> None:
    wrong = np.zeros((1, 63), dtype=np.float32)
    pixels = triton_http.InferInput("pixels", [1, 63], "FP32")
    pixels.set_data_from_numpy(wrong, binary_data=binary_input)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [pixels])
    assert caught.value.status() == "400"
    assert "shape [1, 63] does not match the model's [-1, 64]" in caught.value.message()
    good = triton_http.InferInput("pixels", [1, 64], "FP32")
    good.set_data_from_numpy(PIXELS[:1], binary_data=binary_input)
    assert client.infer(MODEL, [good]).as_numpy("logits").shape == (1, 10)
    assert served.process.poll() is None


# ------------------------------------------------------------------------------------------------------ gRPC


@pytest.fixture
def grpc_client(served: Served) -> Iterator[triton_grpc.InferenceServerClient]:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    yield client
    client.close()


def test_grpc_health_readiness_and_metadata(grpc_client: triton_grpc.InferenceServerClient) -> None:
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready(MODEL) and grpc_client.is_model_ready(MODEL, VERSION)
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.is_model_ready("other")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert grpc_client.get_server_metadata(as_json=True)["name"] == "shipyard"
    model = grpc_client.get_model_metadata(MODEL, as_json=True)
    assert model["name"] == MODEL and model["versions"] == [VERSION] and model["platform"] == "pytorch"
    assert model["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": ["-1", "64"]}]  # int64 as JSON strings
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]


def test_grpc_infer_with_raw_contents(served: Served, grpc_client: triton_grpc.InferenceServerClient) -> None:
    pixels = triton_grpc.InferInput("pixels", list(PIXELS.shape), "FP32")
    pixels.set_data_from_numpy(PIXELS)  # raw_input_contents
    result = grpc_client.infer(MODEL, [pixels], model_version=VERSION, request_id="g1",
                               outputs=[triton_grpc.InferRequestedOutput("logits")])
    got = result.as_numpy("logits")
    assert got is not None and got.dtype == np.float32 and got.shape == (3, 10)
    np.testing.assert_allclose(got, served.expected(PIXELS), rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert response.id == "g1" and response.model_version == VERSION and len(response.raw_output_contents) == 1


def test_grpc_infer_with_typed_contents(served: Served) -> None:
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend(PIXELS[0].tolist())
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    (output,) = response.outputs
    assert output.name == "logits" and list(output.shape) == [1, 10] and response.id == "typed"
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, 10)
    np.testing.assert_allclose(got, served.expected(PIXELS[:1]), rtol=1e-5, atol=1e-5)


def test_grpc_bad_shape_is_invalid_argument_and_the_server_keeps_serving(
    served: Served, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    wrong = triton_grpc.InferInput("pixels", [1, 63], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer(MODEL, [wrong])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "shape [1, 63] does not match the model's [-1, 64]" in caught.value.message()
    good = triton_grpc.InferInput("pixels", [1, 64], "FP32")
    good.set_data_from_numpy(PIXELS[:1])
    assert grpc_client.infer(MODEL, [good]).as_numpy("logits").shape == (1, 10)


def test_grpc_message_over_the_payload_limit_is_resource_exhausted(
    served: Served, grpc_client: triton_grpc.InferenceServerClient
) -> None:
    rows = MAX_PAYLOAD // (64 * 4) + 16
    big = triton_grpc.InferInput("pixels", [rows, 64], "FP32")
    big.set_data_from_numpy(np.zeros((rows, 64), dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer(MODEL, [big])
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert grpc_client.is_server_live() and served.process.poll() is None


def test_grpc_requests_are_counted_with_a_protocol_label(served: Served,
                                                         grpc_client: triton_grpc.InferenceServerClient) -> None:
    def counts() -> dict[tuple[str, str], float]:
        connection = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=30)
        try:  # tritonclient has no call for the metrics
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "shipyard_requests_total":
                    out[(sample.labels["protocol"], sample.labels["code"])] = sample.value
        return out

    before = counts()
    good = triton_grpc.InferInput("pixels", [1, 64], "FP32")
    good.set_data_from_numpy(PIXELS[:1])
    grpc_client.infer(MODEL, [good])
    bad = triton_grpc.InferInput("pixels", [1, 64], "INT64")
    bad.set_data_from_numpy(np.zeros((1, 64), dtype=np.int64))
    with pytest.raises(InferenceServerException):
        grpc_client.infer(MODEL, [bad])
    after = counts()
    assert after[("grpc", "200")] == before[("grpc", "200")] + 1
    assert after[("grpc", "400")] == before[("grpc", "400")] + 1
    assert after[("http", "200")] == before[("http", "200")]


def test_grpc_garbage_is_invalid_argument_unserved_methods_unimplemented(served: Served) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        for method in ("ModelInfer", "ModelReady"):
            raw = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as caught:
                raw(b"\xff\xff\xff\xff garbage", timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a valid" in caught.value.details()
        statistics = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics
        with pytest.raises(grpc.RpcError) as caught:
            statistics(service_pb2.ModelStatisticsRequest(name=MODEL), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        live = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest())
        assert live.live and served.process.poll() is None


# ------------------------------------------------------------------------------------------- asyncio clients


async def test_asyncio_clients_over_rest_and_grpc(served: Served) -> None:
    """tritonclient's asyncio clients (aiohttp for REST, grpc.aio), many requests in flight at once."""
    rest = triton_http_aio.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    rpc = triton_grpc_aio.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    try:
        assert await rest.is_server_ready() and await rpc.is_server_ready()

        async def rest_infer(row: int) -> np.ndarray:
            pixels = triton_http_aio.InferInput("pixels", [1, 64], "FP32")
            pixels.set_data_from_numpy(PIXELS[row : row + 1], binary_data=True)
            result = await rest.infer(MODEL, [pixels],
                                      outputs=[triton_http_aio.InferRequestedOutput("logits", binary_data=True)])
            return result.as_numpy("logits")

        async def rpc_infer(row: int) -> np.ndarray:
            pixels = triton_grpc_aio.InferInput("pixels", [1, 64], "FP32")
            pixels.set_data_from_numpy(PIXELS[row : row + 1])
            return (await rpc.infer(MODEL, [pixels])).as_numpy("logits")

        answers = await asyncio.gather(*(call(row) for row in range(3) for call in (rest_infer, rpc_infer) * 4))
        for index, got in enumerate(answers):
            row = index // 8
            np.testing.assert_allclose(got, served.expected(PIXELS[row : row + 1]), rtol=1e-5, atol=1e-5)
    finally:
        await rest.close()
        await rpc.close()


# ---------------------------------------------------------------------------------------------- KServe's client
# kserve.inference_client (KServe's own Python SDK): InferenceRESTClient (httpx, V2 protocol, JSON and binary
# inputs) and InferenceGRPCClient (grpc.aio, KServe's generated grpc_predict_v2 messages). KServe's generated
# messages and tritonclient's (which the server and this module import) both define the protobuf package
# `inference` in the process-wide descriptor pool, which refuses the second: KServe's client runs in a process of its
# own (tests/unit/kserve_client_probe.py), which prints what each call answered for the assertions here.


def test_kserve_clients_over_rest_and_grpc(served: Served) -> None:
    import json

    probe = os.path.join(os.path.dirname(__file__), "kserve_client_probe.py")
    command = [sys.executable, probe, "--http-port", str(served.http_port), "--grpc-port", str(served.grpc_port),
               "--model", MODEL]
    answer = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            input=json.dumps(PIXELS.tolist()))
    assert answer.returncode == 0, answer.stderr
    results = json.loads(answer.stdout)
    expected = served.expected(PIXELS)
    assert set(results) == {"rest-json", "rest-binary", "grpc"}
    for transport, result in results.items():
        assert result["live"] and result["ready"] and result["model_ready"], transport
        assert result["metadata"] == {"name": MODEL, "inputs": [["pixels", "FP32", [-1, 64]]],
                                      "outputs": [["logits", "FP32", [-1, 10]]]}, transport
        np.testing.assert_allclose(np.array(result["infer"]), expected, rtol=1e-5, atol=1e-5)
        assert "input 'pixels'" in result["bad_shape"]["message"], transport
        assert result["ready_after"], transport
    assert results["rest-json"]["bad_shape"]["status"] == results["rest-binary"]["bad_shape"]["status"] == 400
    assert results["grpc"]["bad_shape"]["status"] == "INVALID_ARGUMENT"
