"""Unit tests of pruning on tiny models: global L1 sparsity and structured shrinking (Linear, Conv, BatchNorm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from shipyard.runtime import models, prune
from shipyard.runtime.artifacts import store


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return models.build_digits_mlp(hidden=(20, 10)).eval()


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + x)


@pytest.mark.parametrize(
    ("scores", "amount", "keep"),
    [
        pytest.param([0.1, 0.9, 0.5, 0.2], 0.5, (1, 2), id="half"),
        pytest.param([0.1, 0.9, 0.5, 0.2], 0.99, (1,), id="keeps-at-least-one"),
        pytest.param([3.0, 1.0, 2.0], 0.3, (0, 2), id="rounds"),
    ],
)
def test_keep_indices(scores: list[float], amount: float, keep: tuple[int, ...]) -> None:
    assert prune.build_keep_indices(torch.tensor(scores), amount) == keep


@pytest.mark.parametrize(
    ("norm", "expected"), [pytest.param(1, [3.0, 1.0], id="L1"), pytest.param(2, [5**0.5, 1.0], id="L2")]
)
def test_unit_scores(norm: int, expected: list[float]) -> None:
    weight = torch.tensor([[1.0, -2.0], [0.0, 1.0]])
    assert prune.build_unit_scores(weight, norm).tolist() == pytest.approx(expected)


def test_global_prune_zeroes_the_smallest_weights_across_layers() -> None:
    model = _mlp()
    everything = torch.cat([m.weight.detach().abs().flatten() for m in model if isinstance(m, nn.Linear)])
    threshold = everything.kthvalue(int(0.8 * everything.numel())).values
    attached = prune.apply_global_prune(model, 0.8)
    prune.apply_prune_removal(attached)
    assert prune.evaluate_sparsity(model) == pytest.approx(0.8, abs=1e-3)
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        assert type(layer.weight) is nn.Parameter and not hasattr(layer, "weight_mask")
        assert (layer.weight.abs()[layer.weight != 0] >= threshold).all()


def test_structured_prune_shrinks_an_mlp_and_keeps_the_strongest_units() -> None:
    model = _mlp()
    x = torch.rand(5, 64)
    norms = model[0].weight.detach().norm(dim=1)
    plans = prune.plan_structured_prune(model, [x], amount=0.5, norm=2)
    assert [p.fqn for p in plans] == ["0", "2"]  # the output layer "4" keeps its 10 classes
    changes = prune.apply_structured_prune(model, plans)
    assert changes == {"0": [20, 10], "2": [10, 5]}
    assert (model[0].out_features, model[2].in_features, model[2].out_features, model[4].in_features) == (10, 10, 5, 5)
    kept = torch.tensor(plans[0].keep)
    assert set(kept.tolist()) == set(norms.topk(10).indices.tolist())
    assert model(x).shape == (5, 10)


def test_structured_prune_matches_masking_the_removed_units() -> None:
    """The smaller model computes exactly what the original computes with those units forced to zero."""
    model = _mlp()
    x = torch.rand(6, 64)
    plans = prune.plan_structured_prune(model, [x], amount=0.5)
    masked = models.build_digits_mlp(hidden=(20, 10)).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for plan in plans:
            layer = masked.get_submodule(plan.fqn)
            drop = torch.ones(layer.out_features, dtype=torch.bool)
            drop[list(plan.keep)] = False
            layer.weight[drop] = 0
            layer.bias[drop] = 0
    prune.apply_structured_prune(model, plans)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-6)


def test_structured_prune_shrinks_a_cnn_through_batchnorm_pool_and_flatten() -> None:
    torch.manual_seed(0)
    model = models.build_digits_cnn(channels=(8, 6), hidden=12).eval()
    x = torch.rand(4, 64)
    # Give the batch norms non-trivial statistics so that slicing them matters.
    model.train()
    model(torch.rand(32, 64))
    model.eval()
    before = model(x)
    plans = prune.plan_structured_prune(model, [x], amount=0.5)
    assert {p.fqn for p in plans} == {"conv1", "conv2", "fc1"}
    conv2 = next(p for p in plans if p.fqn == "conv2")
    assert {(d.fqn, d.role, d.group) for d in conv2.dependents} == {("bn2", "norm", 1), ("fc1", "consumer", 16)}
    prune.apply_structured_prune(model, plans)
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (4, 4, 4)
    assert (model.conv2.out_channels, model.bn2.num_features, model.fc1.in_features) == (3, 3, 48)
    assert model(x).shape == before.shape


def test_structured_prune_round_trips_through_the_artifact(tmp_path: Path) -> None:
    model = _mlp()
    x = torch.rand(3, 64)
    prune.apply_structured_prune(model, prune.plan_structured_prune(model, [x], amount=0.7))
    manifest = store.save_model(
        model,
        tmp_path / "m",
        name="m",
        factory="shipyard.runtime.models:build_digits_mlp",
        factory_kwargs={"hidden": [20, 10]},
        inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    )
    assert manifest["structure"]["0"]["out_features"] == 6
    loaded = store.load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))


def test_a_layer_feeding_a_residual_is_left_whole() -> None:
    with pytest.raises(prune.PruneError, match="found no layer"):
        prune.plan_structured_prune(_Residual().eval(), [torch.rand(2, 8)], amount=0.5)


@pytest.mark.parametrize("amount", [pytest.param(0.0, id="zero"), pytest.param(1.0, id="one")])
def test_amount_out_of_range(amount: float) -> None:
    with pytest.raises(prune.PruneError, match="amount must be in"):
        prune.apply_global_prune(_mlp(), amount)
    with pytest.raises(prune.PruneError, match="amount must be in"):
        prune.plan_structured_prune(_mlp(), [torch.rand(1, 64)], amount)


def test_untraceable_model_asks_for_global_scope() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.sum() > 0 else x

    with pytest.raises(prune.PruneError, match="use scope global"):
        prune.plan_structured_prune(Branchy(), [torch.rand(1, 4)], 0.5)


def _linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def _forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


@pytest.mark.parametrize(("amount", "shapes"), [
    pytest.param(0.5, [(64, 15), (15, 10), (10, 10)], id="half"),
    pytest.param(0.7, [(64, 9), (9, 6), (6, 10)], id="0.7-as-the-example-recipe"),
    pytest.param(0.9, [(64, 3), (3, 2), (2, 10)], id="0.9"),
])
def test_structured_prune_cuts_parameters_and_the_matmul_work(amount: float, shapes: list[tuple[int, int]]) -> None:
    """What makes structured pruning faster without quantization: every matmul is physically smaller, so the
    parameter count and the forward FLOPs (counted by torch's FlopCounterMode) drop with the kept units; global
    unstructured pruning at the same amount zeroes weights but leaves every shape, and so the dense work, as it was.
    Shapes and counts only, no timing."""
    torch.manual_seed(0)
    model = models.build_digits_mlp(hidden=(30, 20)).eval()
    x = torch.rand(256, 64)
    assert _linear_shapes(model) == [(64, 30), (30, 20), (20, 10)]
    params_before, flops_before = sum(p.numel() for p in model.parameters()), _forward_flops(model, x)
    assert flops_before == 2 * 256 * (64 * 30 + 30 * 20 + 20 * 10)

    prune.apply_structured_prune(model, prune.plan_structured_prune(model, [x[:2]], amount=amount))
    assert _linear_shapes(model) == shapes
    macs = sum(i * o for i, o in shapes)
    assert sum(p.numel() for p in model.parameters()) == macs + sum(o for _, o in shapes) < params_before
    assert _forward_flops(model, x) == 2 * 256 * macs
    assert _forward_flops(model, x) < flops_before * (1 - amount + 0.1)
    assert model(x).shape == (256, 10)

    unstructured = models.build_digits_mlp(hidden=(30, 20)).eval()
    prune.apply_prune_removal(prune.apply_global_prune(unstructured, amount))
    assert _linear_shapes(unstructured) == [(64, 30), (30, 20), (20, 10)]
    assert sum(p.numel() for p in unstructured.parameters()) == params_before
    assert _forward_flops(unstructured, x) == flops_before
