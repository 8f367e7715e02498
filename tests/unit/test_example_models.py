"""The example model builders' pure parts (examples/models/build_models.py): how the e2e catalogue's inaccurate
digits model (`*-inaccurate` tags) is made wrong. Training and writing model directories are exercised by
test_compress_examples.py and the e2e tier."""

from __future__ import annotations

import pytest
import torch

from shipyard.runtime import models
from tests.modules import load_file
from tests.stack import REPO

build_models = load_file("build_models", REPO / "examples" / "models" / "build_models.py")


@pytest.mark.parametrize(("classes", "expected"), [
    pytest.param(5, {0: 1, 1: 2, 2: 3, 3: 4, 4: 0, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9}, id="first-five-rotated"),
    pytest.param(10, {k: (k + 1) % 10 for k in range(10)}, id="all-rotated"),
    pytest.param(1, {k: k for k in range(10)}, id="one-unit-is-unchanged"),
])
def test_output_rotation_moves_each_answer_to_the_next_class(classes: int, expected: dict[int, int]) -> None:
    torch.manual_seed(0)
    model = models.build_digits_mlp(hidden=(16,))
    model.eval()
    inputs = torch.randn(2000, 64)
    with torch.no_grad():
        before = model(inputs)
        build_models.apply_output_rotation(model, classes)
        after = model(inputs)
    rolled = before.clone()
    rolled[:, :classes] = before[:, :classes].roll(1, dims=1)  # logit k now is what logit k - 1 was
    assert torch.allclose(after, rolled)
    answers = {int(b): int(a) for b, a in zip(before.argmax(dim=1), after.argmax(dim=1), strict=True)}
    assert len(answers) >= 4 and answers == {k: expected[k] for k in answers}
