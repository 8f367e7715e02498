"""The pure parts of `shipyard-runtime evaluate`: settings from flags and environment, the metrics a task reports,
batches, output checks, scores, the `--min` decision and the one-line summary (with its value field)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from shipyard import contract
from shipyard.runtime import liveeval

URL = "http://digits-1-1-0.models.svc:8080"
ENV = {contract.ENV_ENDPOINT: URL, contract.ENV_MODEL_NAME: "digits"}


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        pytest.param(["--dataset", "builtin:digits"], ENV,
                     {"url": URL, "model": "digits", "samples": 1000, "batch_size": 32, "concurrency": 4,
                      "timeout_s": 10.0, "reference_url": None, "minimums": (),
                      "termination_log": contract.TERMINATION_LOG}, id="defaults-from-the-environment"),
        pytest.param(["--dataset", "builtin:digits", "--url", "http://127.0.0.1:9000", "--model", "m"], ENV,
                     {"url": "http://127.0.0.1:9000", "model": "m"}, id="flags-over-environment"),
        pytest.param(["--dataset", "builtin:digits"], {**ENV, contract.ENV_REFERENCE_ENDPOINT: "http://stable:8080"},
                     {"reference_url": "http://stable:8080", "reference_model": None}, id="reference-from-env"),
        pytest.param(["--dataset", "builtin:digits", "--reference-url", "http://s", "--reference-model", "old"],
                     {**ENV, contract.ENV_REFERENCE_ENDPOINT: ""},
                     {"reference_url": "http://s", "reference_model": "old"}, id="reference-flags"),
        pytest.param(["--dataset", "builtin:digits"], {**ENV, contract.ENV_REFERENCE_ENDPOINT: "  "},
                     {"reference_url": None}, id="blank-env-is-unset"),
        pytest.param(["--dataset", "m:f", "--min", "accuracy=0.95", "--min", "agreement=.9", "--samples", "200",
                      "--batch-size", "8", "--concurrency", "2", "--timeout", "2.5", "--termination-log", ""], ENV,
                     {"dataset": "m:f", "minimums": (("accuracy", 0.95), ("agreement", 0.9)), "samples": 200,
                      "batch_size": 8, "concurrency": 2, "timeout_s": 2.5, "termination_log": None}, id="all-flags"),
    ],
)
def test_build_config(argv: list[str], env: dict[str, str], expected: dict[str, Any]) -> None:
    config = liveeval.build_config(argv, env)
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        pytest.param([], ENV, "the following arguments are required: --dataset", id="no-dataset"),
        pytest.param(["--dataset", "d"], {contract.ENV_MODEL_NAME: "m"}, "no endpoint: pass --url or set "
                     "SHIPYARD_ENDPOINT", id="no-url"),
        pytest.param(["--dataset", "d"], {contract.ENV_ENDPOINT: URL}, "no model name: pass --model or set "
                     "SHIPYARD_MODEL_NAME", id="no-model"),
        pytest.param(["--dataset", "d", "--url", "digits:8080"], ENV, "--url: digits:8080: the URL must start",
                     id="url-scheme"),
        pytest.param(["--dataset", "d", "--reference-url", "http://u:s3cret@stable"], ENV,
                     "--reference-url: http://stable: credentials in the URL are not supported", id="credentials"),
        pytest.param(["--dataset", "d", "--samples", "0"], ENV, "--samples must be at least 1, got 0", id="samples"),
        pytest.param(["--dataset", "d", "--batch-size", "-1"], ENV, "--batch-size must be at least 1", id="batch"),
        pytest.param(["--dataset", "d", "--concurrency", "65"], ENV, "--concurrency must be between 1 and 64",
                     id="concurrency"),
        pytest.param(["--dataset", "d", "--timeout", "0"], ENV, "--timeout must be a positive number", id="timeout"),
        pytest.param(["--dataset", "d", "--timeout", "nan"], ENV, "--timeout must be a positive number",
                     id="timeout-nan"),
        pytest.param(["--dataset", "d", "--samples", "many"], ENV, "argument --samples: invalid int value",
                     id="not-a-number"),
        pytest.param(["--dataset", "d", "--min", "accuracy"], ENV, "--min 'accuracy': expected METRIC=NUMBER",
                     id="min-no-value"),
        pytest.param(["--dataset", "d", "--min", "accuracy=high"], ENV, "expected METRIC=NUMBER", id="min-text"),
        pytest.param(["--dataset", "d", "--min", "=0.9"], ENV, "expected METRIC=NUMBER", id="min-no-metric"),
        pytest.param(["--dataset", "d", "--min", "accuracy=inf"], ENV, "expected METRIC=NUMBER", id="min-inf"),
        pytest.param(["--dataset", "d", "--min", "accuracy=0.9", "--min", "accuracy=0.8"], ENV,
                     "--min accuracy is given twice", id="min-twice"),
        pytest.param(["--dataset", "d", "--verbose"], ENV, "unrecognized arguments: --verbose", id="unknown-flag"),
    ],
)
def test_build_config_names_the_bad_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(liveeval.ConfigError) as caught:
        liveeval.build_config(argv, env)
    assert message in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("task", "reference", "names"),
    [
        pytest.param("classification", False, ("accuracy",), id="classification"),
        pytest.param("classification", True, ("accuracy", "agreement"), id="classification-reference"),
        pytest.param("binary", False, ("auc", "accuracy"), id="binary"),
        pytest.param("binary", True, ("auc", "accuracy", "agreement"), id="binary-reference"),
        pytest.param("embedding", True, ("cosine", "nn_agreement"), id="embedding"),
    ],
)
def test_build_metric_names_start_with_the_primary_metric(task: str, reference: bool, names: tuple[str, ...]) -> None:
    assert liveeval.build_metric_names(task, reference) == names
    assert names[0] == liveeval.evaluate.PRIMARY_METRIC[task]


@pytest.mark.parametrize(
    ("minimums", "task", "reference", "problems"),
    [
        pytest.param([("accuracy", 0.9)], "classification", False, [], id="accuracy"),
        pytest.param([("agreement", 0.9)], "classification", True, [], id="agreement-with-reference"),
        pytest.param([("agreement", 0.9)], "classification", False,
                     ["--min agreement: needs --reference-url (agreement with the reference's predictions)"],
                     id="agreement-without-reference"),
        pytest.param([("auc", 0.8)], "classification", False,
                     ["--min auc: not a metric of classification datasets (metrics: accuracy, agreement)"],
                     id="wrong-task"),
        pytest.param([("cosine", 0.99)], "embedding", False,
                     ["embedding datasets compare the candidate's outputs with the reference's: pass --reference-url "
                      "(or set SHIPYARD_REFERENCE_ENDPOINT)"], id="embedding-without-reference"),
        pytest.param([("nn_agreement", 0.95)], "embedding", True, [], id="embedding"),
    ],
)
def test_assess_minimums(minimums: list[tuple[str, float]], task: str, reference: bool, problems: list[str]) -> None:
    assert liveeval.assess_minimums(minimums, task, reference) == problems


@pytest.mark.parametrize(
    ("rows", "batch_size", "sizes"),
    [
        pytest.param(100, 32, [32, 32, 32, 4], id="partial-last"),
        pytest.param(64, 32, [32, 32], id="exact"),
        pytest.param(5, 32, [5], id="one-small"),
        pytest.param(3, 1, [1, 1, 1], id="one-row-each"),
    ],
)
def test_build_batches(rows: int, batch_size: int, sizes: list[int]) -> None:
    ids = torch.arange(rows * 3).reshape(rows, 3)
    weights = torch.rand(rows, 2).to(torch.bfloat16)
    batches = liveeval.build_batches((ids, weights), batch_size)
    assert [len(batch[0]) for batch in batches] == sizes
    assert all(len(batch) == 2 and batch[1].dtype.name == "float32" for batch in batches)
    assert (torch.cat([torch.from_numpy(batch[0]) for batch in batches]) == ids).all()
    assert torch.equal(torch.cat([torch.from_numpy(batch[1]) for batch in batches]), weights.float())


LABELS = torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize(
    ("task", "outputs", "labels", "reference", "problems"),
    [
        pytest.param("classification", torch.zeros(4, 3), LABELS, None, [], id="classification"),
        pytest.param("classification", torch.zeros(4), LABELS, None,
                     ["outputs of shape [4] are not [N, classes] logits"], id="classification-flat"),
        pytest.param("classification", torch.zeros(4, 2), LABELS, None,
                     ["outputs of shape [4, 2] have 2 classes, the labels go up to 2"], id="too-few-classes"),
        pytest.param("binary", torch.zeros(4, 1), LABELS, None, [], id="binary"),
        pytest.param("binary", torch.zeros(4, 2), LABELS, None, ["outputs of shape [4, 2] are not one logit per "
                     "sample"], id="binary-two-logits"),
        pytest.param("embedding", torch.zeros(4, 8), None, torch.zeros(4, 8), [], id="embedding"),
        pytest.param("embedding", torch.zeros(4, 8, 2), None, torch.zeros(4, 8, 2),
                     ["outputs of shape [4, 8, 2] are not [N, D] vectors"], id="embedding-rank-3"),
        pytest.param("embedding", torch.zeros(4, 8), None, torch.zeros(4, 6),
                     ["the reference's outputs of shape [4, 6] differ from the candidate's [4, 8]"],
                     id="reference-differs"),
    ],
)
def test_assess_outputs(
    task: str, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None, problems: list[str]
) -> None:
    assert liveeval.assess_outputs(task, outputs, labels, reference) == problems


LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])  # predicts 0 1 1 2
VECTORS = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])


@pytest.mark.parametrize(
    ("task", "outputs", "labels", "reference", "expected"),
    [
        pytest.param("classification", LOGITS, LABELS, None, {"accuracy": 0.5}, id="accuracy"),
        pytest.param("classification", LOGITS, LABELS, LOGITS[[0, 1, 3, 3]],
                     {"accuracy": 0.5, "agreement": 0.75}, id="agreement"),
        pytest.param("binary", torch.tensor([[3.0], [-1.0], [2.0], [-2.0]]), torch.tensor([1.0, 0.0, 0.0, 0.0]),
                     torch.tensor([[1.0], [1.0], [1.0], [-1.0]]), {"auc": 1.0, "accuracy": 0.75, "agreement": 0.75},
                     id="binary"),
        pytest.param("embedding", VECTORS, None, VECTORS, {"cosine": 1.0, "nn_agreement": 1.0}, id="embedding-same"),
        pytest.param("embedding", VECTORS[:, [1, 0]], None, VECTORS, {"cosine": pytest.approx(0.1098, abs=1e-4),
                     "nn_agreement": 1.0}, id="embedding-swapped-axes"),
    ],
)
def test_evaluate_scores(
    task: str, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None,
    expected: dict[str, float],
) -> None:
    assert liveeval.evaluate_scores(task, outputs, labels, reference) == expected


@pytest.mark.parametrize(
    ("scores", "minimums", "failures"),
    [
        pytest.param({"accuracy": 0.97}, [("accuracy", 0.95)], [], id="holds"),
        pytest.param({"accuracy": 0.95}, [("accuracy", 0.95)], [], id="equal-holds"),
        pytest.param({"accuracy": 0.41333}, [("accuracy", 0.9)], ["accuracy 0.4133 < 0.9"], id="fails"),
        pytest.param({"accuracy": 0.97, "agreement": 0.5}, [("accuracy", 0.9), ("agreement", 0.99)],
                     ["agreement 0.5000 < 0.99"], id="one-of-two"),
        pytest.param({"auc": math.nan}, [("auc", 0.5)], ["auc nan < 0.5"], id="nan-never-holds"),
        pytest.param({"accuracy": 0.2}, [], [], id="no-minimum"),
    ],
)
def test_evaluate_minimums(scores: dict[str, float], minimums: list[tuple[str, float]], failures: list[str]) -> None:
    assert liveeval.evaluate_minimums(scores, minimums) == failures


SUMMARY = {"dataset": "digits", "url": "http://127.0.0.1:8080", "reference_url": None, "primary": "accuracy",
           "samples": 1000, "latencies_s": [0.0031] * 31 + [0.5]}


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        pytest.param({"scores": {"accuracy": 0.9756}},
                     "Evaluated digits at http://127.0.0.1:8080: accuracy 0.9756 on 1000 samples (32 requests, p50 "
                     "3.1 ms) [value=0.9756]", id="measured"),
        pytest.param({"scores": {"accuracy": 0.4133, "agreement": 0.41}, "reference_url": "http://stable:8080",
                      "failures": ["accuracy 0.4133 < 0.9"], "retries": 1},
                     "Evaluated digits at http://127.0.0.1:8080 against http://stable:8080: accuracy 0.4133, agreement "
                     "0.4100 on 1000 samples (32 requests, p50 3.1 ms, 1 connection retry); below the minimum: "
                     "accuracy 0.4133 < 0.9 [value=0.4133]", id="failed-minimum"),
        pytest.param({"scores": {"cosine": 0.99912345, "nn_agreement": 0.98}, "primary": "cosine", "retries": 3,
                      "dataset": "sentence-fidelity"},
                     "Evaluated sentence-fidelity at http://127.0.0.1:8080: cosine 0.9991, nn_agreement 0.9800 on "
                     "1000 samples (32 requests, p50 3.1 ms, 3 connection retries) [value=0.99912345]", id="embedding"),
    ],
)
def test_build_summary_line(extra: dict[str, Any], line: str) -> None:
    built = liveeval.build_summary_line(**{**SUMMARY, **extra})
    assert built == line
    assert contract.parse_value_field(built) == extra["scores"][extra.get("primary", "accuracy")]


@pytest.mark.parametrize("char", [pytest.param("a", id="ascii"), pytest.param("é", id="two-byte")])
def test_summary_line_fits_a_termination_message_and_keeps_its_value(char: str) -> None:
    failures = [f"metric_{char * 50}_{i} 0.1 < 0.9" for i in range(200)]
    line = liveeval.build_summary_line(**{**SUMMARY, "scores": {"accuracy": 0.123456789}, "failures": failures})
    assert len(line.encode()) <= 4000 < 4096
    assert line.endswith("... [value=0.123456789]") and "\n" not in line
    assert contract.parse_value_field(line) == 0.123456789
