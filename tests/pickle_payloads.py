"""Hostile pickle payloads for the tests that prove Shipyard never unpickles weights (shared by the unit tiers)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any


class TouchesFileWhenUnpickled:
    """Unpickling this object runs code: it creates `marker`. A test that finds no marker proved nothing ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.marker,))


def hostile_weights(marker: Path, *, via_torch_save: bool) -> bytes:
    """A 'state_dict' whose only tensor is the payload, as torch.save writes it or as a raw pickle.

    Checks first that the payload really runs when unpickled, so a refusal test cannot pass with a harmless one.
    """
    pickle.loads(pickle.dumps(TouchesFileWhenUnpickled(marker)))
    assert marker.exists(), "the payload did not run when unpickled"
    marker.unlink()
    weights = {"0.weight": TouchesFileWhenUnpickled(marker)}
    if not via_torch_save:
        return pickle.dumps(weights)
    import torch

    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return buffer.getvalue()
