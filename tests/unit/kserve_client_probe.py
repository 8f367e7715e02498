"""KServe's Python client (kserve.inference_client) against a running server, in a process of its own.

Run by tests/unit/test_server_clients.py (KServe's generated gRPC messages cannot share a process with
tritonclient's: both define the protobuf package `inference`). Reads the input rows (a JSON list of 64-float rows)
from stdin; prints, per transport (rest-json, rest-binary, grpc), what live, ready, model ready, model metadata,
infer and a request of a bad shape answered, as JSON on stdout. Neither client has a metadata call: REST metadata is
read with the REST client's httpx session into KServe's pydantic `ModelMetadataResponse`, gRPC metadata through the
gRPC client's stub of KServe's generated service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import grpc
import httpx
import numpy as np
from kserve.inference_client import InferenceGRPCClient, InferenceRESTClient, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2
from kserve.protocol.infer_type import InferInput, InferRequest
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse


def _tensors(metadata: Any) -> dict[str, Any]:
    return {"name": metadata.name,
            "inputs": [[t.name, t.datatype, list(t.shape)] for t in metadata.inputs],
            "outputs": [[t.name, t.datatype, list(t.shape)] for t in metadata.outputs]}


async def probe_rest(base: str, model: str, rows: np.ndarray, binary: bool) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        result: dict[str, Any] = {
            "live": await client.is_server_live(base),
            "ready": await client.is_server_ready(base),
            "model_ready": await client.is_model_ready(base, model),
        }
        response = await client._client.get(f"{base}/v2/models/{model}")
        result["metadata"] = _tensors(ModelMetadataResponse.model_validate(response.json()))
        pixels = InferInput("pixels", list(rows.shape), "FP32")
        pixels.set_data_from_numpy(rows, binary_data=binary)
        answer = await client.infer(base, InferRequest(model, [pixels]), model)
        result["infer"] = answer.outputs[0].as_numpy().tolist()
        bad = InferInput("pixels", [1, 63], "FP32")
        bad.set_data_from_numpy(rows[:1, :63], binary_data=binary)
        try:
            await client.infer(base, InferRequest(model, [bad]), model)
            result["bad_shape"] = {"status": 200, "message": ""}
        except httpx.HTTPStatusError as error:
            result["bad_shape"] = {"status": error.response.status_code, "message": str(error)}
        result["ready_after"] = await client.is_server_ready(base)
        return result
    finally:
        await client.close()


async def probe_grpc(url: str, model: str, rows: np.ndarray) -> dict[str, Any]:
    client = InferenceGRPCClient(url, timeout=60, retries=0)
    try:
        result: dict[str, Any] = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(model),
        }
        metadata = await client._client_stub.ModelMetadata(grpc_predict_v2_pb2.ModelMetadataRequest(name=model))
        result["metadata"] = _tensors(metadata)
        pixels = InferInput("pixels", list(rows.shape), "FP32")
        pixels.set_data_from_numpy(rows)
        answer = await client.infer(InferRequest(model, [pixels]))
        result["infer"] = answer.outputs[0].as_numpy().tolist()
        bad = InferInput("pixels", [1, 63], "FP32")
        bad.set_data_from_numpy(rows[:1, :63])
        try:
            await client.infer(InferRequest(model, [bad]))
            result["bad_shape"] = {"status": "OK", "message": ""}
        except grpc.aio.AioRpcError as error:
            result["bad_shape"] = {"status": error.code().name, "message": error.details() or ""}
        result["ready_after"] = await client.is_server_ready()
        return result
    finally:
        await client.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    rows = np.array(json.load(sys.stdin), dtype=np.float32)
    base = f"http://127.0.0.1:{args.http_port}"
    results = {
        "rest-json": await probe_rest(base, args.model, rows, binary=False),
        "rest-binary": await probe_rest(base, args.model, rows, binary=True),
        "grpc": await probe_grpc(f"127.0.0.1:{args.grpc_port}", args.model, rows),
    }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
