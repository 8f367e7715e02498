"""TorchServe handler of the digits example: the digits MLP (a model directory written by
examples/models/build_models.py, shipped inside the archive's directory) behind TorchServe's own inference API.

Requests: ``POST /predictions/digits`` with an Open Inference Protocol v2 JSON body (``{"inputs": [{"name": "input",
"datatype": "FP32", "shape": [N, 64], "data": [...]}]}``); TorchServe batches them (``batchSize``,
``maxBatchDelay``) and the handler answers each with the OIP v2 JSON response (output ``logits``, ``model_version``
from the SHIPYARD_MODEL_VERSION variable when set).

``SHIPYARD_FAULT_ERROR_RATE`` (0..1) makes that share of batches fail, as the e2e tier's ``*-bad`` image tags do;
TorchServe answers a batch whose handler raised with a 5xx and counts it in its request metrics.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch

_state: dict[str, Any] = {}


def _load(context: Any) -> None:
    from shipyard.runtime.artifacts import store

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model_dir = context.system_properties.get("model_dir")
    _state["module"] = store.load_model(model_dir).module.eval()
    _state["name"] = context.manifest["model"]["modelName"]
    _state["version"] = os.environ.get("SHIPYARD_MODEL_VERSION", context.manifest["model"].get("modelVersion", ""))
    _state["error_rate"] = float(os.environ.get("SHIPYARD_FAULT_ERROR_RATE", "0") or 0)


def _body(row: dict[str, Any]) -> dict[str, Any]:
    body = row.get("body") if row.get("body") is not None else row.get("data")
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body)
    if not isinstance(body, dict) or not body.get("inputs"):
        raise ValueError("the request body must be OIP v2 JSON with an 'inputs' list")
    return body


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    if "module" not in _state:
        _load(context)
    if data is None:
        return None
    if _state["error_rate"] and random.random() < _state["error_rate"]:
        raise RuntimeError("injected fault (SHIPYARD_FAULT_ERROR_RATE)")
    arrays = []
    for row in data:
        item = _body(row)["inputs"][0]
        arrays.append(np.asarray(item["data"], dtype=np.float32).reshape(item["shape"]))
    with torch.inference_mode():
        output = _state["module"](torch.from_numpy(np.concatenate(arrays))).numpy()
    answers, start = [], 0
    for array in arrays:
        part = output[start: start + array.shape[0]]
        start += array.shape[0]
        answers.append(json.dumps({
            "model_name": _state["name"], "model_version": _state["version"],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(part.shape),
                         "data": part.reshape(-1).tolist()}],
        }))
    return answers
