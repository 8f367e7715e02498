"""The Shipyard model format: a model directory with a `shipyard-model.json` manifest and weight files.

Used by the compression Job (`shipyard-runtime compress`) to write its artifact and by the inference server to
load a model; never unpickles arbitrary objects. One module per concern, each importable on its own; this
package root holds only the error they all raise (`ArtifactError`), so importing it loads none of them:

- `manifests`: the manifest document: its schema and validation (`assess_manifest`), the tensor specs of the
  model's inputs and outputs, the digest, and reading + verifying a directory's manifest against its files
  (`load_manifest`, `load_verified_manifest`). Pure apart from those reads; never imports torch.
- `weights`: the weights file: flattening torch tensor subclasses into plain tensors and back
  (`build_plain_state`, `apply_plain_state`), and the encodings (safetensors, safetensors+zstd, a plain
  `torch.save` state_dict) with their safe decoding (`load_weight_tensors`).
- `eager`: the factory kind's `nn.Module`: importing and calling the factory, and the `structure` records of
  layers that structured pruning resized (`build_structure_diff` on save, `apply_structure` on load).
- `programs`: the model as a torch.export program: the export kind's `.pt2` archive (checked, then loaded)
  and the optional AOTInductor package (`write_compiled_package`, `assess_compiled`, `load_compiled_module`).
- `store`: model directories on disk, composing the above: atomic writes (`stage_directory`, `save_model`,
  `write_model_files`), loading (`load_model` -> `LoadedModel`) and what a directory weighs (`build_*_bytes`).

Dependencies go one way: `manifests` <- `eager`, `weights` <- `programs` <- `store`. Why these cuts: the four
inner modules are the four things a model directory is made of (a document, a weights file, a Python module, a
compiled program), each with its own safety rules (digest, no pickles, factory import, native code); `store` is
the only one that knows how they fit together, so a change to an encoding or to the compiled package touches one
module and its tests. The names avoid `manifest`, `compiled` and `factory`, which are parameters and locals of
the public functions (`load_model(compiled=...)`, `save_model(factory=...)`, every `manifest` dict).
"""

from __future__ import annotations


class ArtifactError(ValueError):
    """A model directory cannot be read or written; the message names the file and the problem."""
