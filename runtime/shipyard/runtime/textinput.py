"""Text in: a model that declares a tokenizer (the manifest's `tokenizer`, `artifacts.manifests.TokenizerSpec`)
takes a BYTES input of UTF-8 strings, which the server turns into the model's token-id inputs before batching.

The served inputs are the model's declared inputs plus the text input (`build_served_inputs`): a request carries
either the text input (and any declared input the tokenizer does not fill) or the token-id inputs themselves, as
before. A text request is tokenized on arrival (truncated to `maxLength`, padded to its own longest text) and keyed
so that text requests batch together whatever their lengths; the batch pads every fed input to the batch's longest
sequence (`build_padded_batch`, in `engine.run_jobs`). Inputs of a fixed sequence length ([-1, N]) are padded to N.

Pure: `build_served_inputs`, `build_text_specs`, `build_texts`, `build_padded_batch`, `build_token_arrays`,
`plan_text_request`. I/O: `load_text_input` reads the tokenizer file (the `tokenizers` library).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.runtime import oip
from shipyard.runtime.artifacts import ArtifactError, manifests

TEXT_KEY = (-1,)  # the non-batch "shape" a text request is keyed by: no real input has a -1 size


@dataclass(frozen=True)
class TextSpec:
    """The text input: BYTES, one string per row."""

    name: str
    datatype: str = "BYTES"
    shape: tuple[int, ...] = (-1,)


def build_served_inputs(inputs: Sequence[oip.TensorSpecLike], spec: manifests.TokenizerSpec) -> list[Any]:
    """What the model's metadata lists: its declared inputs, then the text input. Pure."""
    return [*inputs, TextSpec(spec.text)]


def build_text_specs(inputs: Sequence[oip.TensorSpecLike], spec: manifests.TokenizerSpec) -> list[Any]:
    """What a text request carries: the text input, then the declared inputs the tokenizer does not fill. Pure."""
    fed = set(spec.fed_inputs)
    return [TextSpec(spec.text), *(s for s in inputs if s.name not in fed)]


def build_texts(array: np.ndarray, name: str) -> list[str]:
    """The strings of a BYTES input (bytes from the binary forms, str from JSON); raises BadRequest naming the input
    and the element for bytes that are not UTF-8. Pure."""
    texts = []
    for index, element in enumerate(array.reshape(-1).tolist()):
        if type(element) is str:
            texts.append(element)
            continue
        try:
            texts.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError as error:
            raise oip.BadRequest(f"input {name!r}: element {index} is not valid UTF-8 ({error.reason} at byte "
                                 f"{error.start})") from None
    return texts


def build_padded_batch(arrays: Sequence[np.ndarray], pad: int, length: int | None = None) -> np.ndarray:
    """Concatenate [rows, L_i] arrays along the batch axis, padding each on the right with `pad` to the longest L_i
    (or to `length`). Pure."""
    width = length if length is not None else max(array.shape[1] for array in arrays)
    if all(array.shape[1] == width for array in arrays):
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    rows = sum(array.shape[0] for array in arrays)
    out = np.full((rows, width), pad, dtype=arrays[0].dtype)
    start = 0
    for array in arrays:
        out[start : start + array.shape[0], : array.shape[1]] = array
        start += array.shape[0]
    return out


def build_token_arrays(
    ids: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]], pad_id: int,
    dtypes: tuple[np.dtype[Any], np.dtype[Any], np.dtype[Any]], length: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token lists (one per text, unpadded) as [rows, L] arrays padded to the longest (or to `length`): ids with
    `pad_id`, masks and type ids with 0. Pure."""
    width = length if length is not None else max((len(row) for row in ids), default=0)
    out = []
    for rows, pad, dtype in ((ids, pad_id, dtypes[0]), (masks, 0, dtypes[1]), (type_ids, 0, dtypes[2])):
        array = np.full((len(rows), width), pad, dtype=dtype)
        for i, row in enumerate(rows):
            array[i, : len(row)] = row[:width]
        out.append(array)
    return out[0], out[1], out[2]


def plan_text_request(names: Sequence[str], text_name: str) -> bool:
    """Whether a request whose inputs have these names is a text request (it names the text input). Pure."""
    return text_name in names


class TextInput:
    """A loaded tokenizer and what the server needs to serve text: the served and text specs, and the conversion
    of a parsed text request into a request of the model's inputs."""

    def __init__(self, spec: manifests.TokenizerSpec, tokenizer: Any, inputs: Sequence[oip.TensorSpecLike]) -> None:
        self.spec = spec
        self.name = spec.text
        self.tokenizer = tokenizer
        self.model_inputs = list(inputs)
        self.served_inputs = build_served_inputs(inputs, spec)
        self.text_specs = build_text_specs(inputs, spec)
        self._name_token = b'"' + spec.text.encode() + b'"'
        by_name = {s.name: s for s in inputs}
        ids_spec = by_name[spec.ids]
        self.length = None if ids_spec.shape[1] == -1 else int(ids_spec.shape[1])  # a fixed sequence length
        limit = spec.max_length if self.length is None else min(spec.max_length, self.length)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=limit)
        role_by_name = {spec.ids: 0, **({spec.mask: 1} if spec.mask else {}),
                        **({spec.type_ids: 2} if spec.type_ids else {})}
        self._roles = [role_by_name.get(s.name) for s in inputs]  # per model input: ids/mask/type ids or None
        self._pad_values = tuple(
            (spec.pad_id if role == 0 else 0) if role is not None else None for role in self._roles
        )
        dtype = {s.name: oip.NUMPY_BY_DATATYPE[s.datatype] for s in inputs}
        default = np.dtype(np.int64)
        self._dtypes = (
            dtype[spec.ids],
            dtype[spec.mask] if spec.mask else default,
            dtype[spec.type_ids] if spec.type_ids else default,
        )
        self._others = [i for i, role in enumerate(self._roles) if role is None]  # model inputs sent as they are

    def tokenize(self, texts: Sequence[str]) -> tuple[list[np.ndarray], int]:
        """The fed arrays (ids, mask, type ids) of these texts, padded to the longest, and the tokens counted."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = [e.ids for e in encodings]
        arrays = build_token_arrays(
            ids, [e.attention_mask for e in encodings], [e.type_ids for e in encodings], self.spec.pad_id,
            self._dtypes, self.length,
        )
        return list(arrays), sum(len(row) for row in ids)

    def build_model_request(
        self, texts: Sequence[str], others: Sequence[np.ndarray], template: oip.InferRequest | None = None
    ) -> tuple[oip.InferRequest, int]:
        """A request of the model's inputs from texts and the other (non-fed) inputs' arrays; `template` gives the
        id and the output selection. Returns it and the number of tokens."""
        fed, tokens = self.tokenize(texts)
        return self._assemble(fed, others, len(texts), template), tokens

    def build_token_request(self, token_ids: Sequence[Sequence[int]]) -> tuple[oip.InferRequest, int]:
        """A request of the model's inputs from already tokenized texts (lists of token ids: truncated to the
        limit, mask 1, type ids 0); raises BadRequest for an id outside the vocabulary. Returns it and the tokens."""
        vocabulary = int(self.tokenizer.get_vocab_size())
        limit = self.spec.max_length if self.length is None else min(self.spec.max_length, self.length)
        rows = []
        for index, row in enumerate(token_ids):
            if max(row, default=0) >= vocabulary:
                raise oip.BadRequest(f"input {index}: token id {max(row)} is outside the vocabulary "
                                     f"(0..{vocabulary - 1})")
            rows.append(list(row[:limit]))
        # at least 2 wide, as any tokenized text is ([CLS] [SEP]): a compiled package's dynamic sequence axis starts
        # at 2 (torch.export specialises sizes 0 and 1); the padding is masked out
        width = self.length if self.length is not None else max(2, max((len(r) for r in rows), default=0))
        fed = build_token_arrays(rows, [[1] * len(r) for r in rows], [[0] * len(r) for r in rows],
                                 self.spec.pad_id, self._dtypes, width)
        return self._assemble(list(fed), [], len(rows), None), sum(len(r) for r in rows)

    def _assemble(
        self, fed: Sequence[np.ndarray], others: Sequence[np.ndarray], rows: int, template: oip.InferRequest | None
    ) -> oip.InferRequest:
        if len(others) != len(self._others):
            names = [self.model_inputs[i].name for i in self._others]
            raise oip.BadRequest(f"the model also takes input(s) {names}, which only an inference request can carry")
        arrays: list[np.ndarray] = []
        others_iter = iter(others)
        for role in self._roles:
            arrays.append(fed[role] if role is not None else next(others_iter))
        key = (TEXT_KEY, *(arrays[i].shape[1:] for i in self._others))
        if template is None:
            return oip.InferRequest(arrays, rows, key, None, None, None, self._pad_values)
        return oip.InferRequest(arrays, rows, key, template.request_id, template.output_indices,
                                template.binary_outputs, self._pad_values)

    def convert(self, parsed: oip.InferRequest) -> oip.InferRequest:
        """A parsed text request (arrays in `text_specs` order) as a request of the model's inputs."""
        texts = build_texts(parsed.arrays[0], self.name)
        request, _ = self.build_model_request(texts, parsed.arrays[1:], parsed)
        return request

    def build_infer_request(
        self, body: bytes, inference_header: bytes | None, outputs: Sequence[oip.TensorSpecLike]
    ) -> oip.InferRequest:
        """Parse a REST inference request: a text request when its JSON header names the text input (converted to
        the model's inputs), else a request of the model's inputs as without a tokenizer."""
        header = body
        if inference_header is not None:
            text = inference_header.strip()
            if text.isdigit() and len(text) <= 18 and int(text) > 0:
                header = body[: int(text)]
        if self._name_token in header:  # a cheap scan; the name may also occur elsewhere (an id, a string)
            try:
                parsed = oip.build_infer_request(body, self.text_specs, outputs, inference_header)
            except oip.BadRequest as error:
                try:  # not a text request after all: one of the model's inputs, or the text request's error
                    return oip.build_infer_request(body, self.model_inputs, outputs, inference_header)
                except oip.BadRequest:
                    raise error from None
            return self.convert(parsed)
        return oip.build_infer_request(body, self.model_inputs, outputs, inference_header)


def load_text_input(model: Any) -> TextInput | None:
    """The text interface of a loaded model (`artifacts.store.LoadedModel`): its tokenizer loaded from the model
    directory, None when the manifest declares none. Raises ArtifactError naming the file when it does not load."""
    manifest = getattr(model, "manifest", None)
    if not isinstance(manifest, dict) or manifest.get("tokenizer") is None:
        return None
    spec = manifests.build_tokenizer_spec(manifest["tokenizer"], model.inputs)
    assert spec is not None
    path = Path(model.path) / spec.file
    return TextInput(spec, load_tokenizer(path), model.inputs)


def load_tokenizer(path: Path) -> Any:
    """A `tokenizers.Tokenizer` from its JSON file; raises ArtifactError naming the file when it cannot load."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises a bare Exception for a file that is missing or not a tokenizer
        raise ArtifactError(f"tokenizer file {path}: cannot be loaded: {error}") from None
