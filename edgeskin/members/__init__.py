"""Members: anything that turns an image into probabilities (its own preprocessing plus
``probs(batch)``), and the importers that bring members trained elsewhere into an ensemble folder.

One module per source: :mod:`.onnx` (ONNX from any framework, run in ONNX Runtime),
:mod:`.keras` (``.keras``/``.h5`` through Keras 3 on the torch backend, converted to ONNX),
:mod:`.torchnet` (timm and torchvision state_dicts), and edgeskin's own checkpoints
(:mod:`edgeskin.models.checkpoint`). :mod:`.importer` checks and writes them; :mod:`.declare`
holds the presets. Nothing here imports torch at module level.
"""

from .base import ClassMap, Member, build_class_map, convert_view, softmax
from .loader import load_member, load_members
from .run import ensemble_fn, eval_inputs, member_probs

__all__ = ["ClassMap", "Member", "build_class_map", "convert_view", "softmax", "load_member", "load_members",
           "ensemble_fn", "eval_inputs", "member_probs"]
