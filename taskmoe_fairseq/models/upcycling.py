"""Sparse upcycling: an MoE model's training starts from a dense model's weights (Komatsuzaki
et al., 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints", arXiv
2212.05055, section 3): every expert of an MoE layer starts as a copy of that layer's dense FFN,
every other weight is the dense model's, and the gates keep their own initialisation.

It runs on fairseq's own fine-tuning path: ``fairseq-train ... --finetune-from-model DENSE.pt
--moe-upcycle`` (fairseq resets the optimizer, the learning-rate schedule, the meters and the data
loader, and later runs resume from the MoE model's own checkpoint_last.pt as usual). fairseq's
``load_state_dict`` first calls the model's ``upgrade_state_dict_named``, which calls
:func:`upcycle_state_dict`. The dense model is a ``taskmoe_transformer`` with
``--encoder-moe-freq 0 --decoder-moe-freq 0`` (exactly fairseq's ``transformer``) of the same sizes.

Because a task's (or token's) k expert weights sum to 1 (``--moe-task-gate-weights top-k``, GShard's
token gate), the upcycled model computes the dense model's function before its first update
(tests/test_upcycling.py).
"""

import re
from typing import Dict, Tuple

import torch.nn as nn
from torch import Tensor

from taskmoe_fairseq.errors import usage_error
from taskmoe_fairseq.modules.expert_feed_forward import STACKED_NAMES

FFN_PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
# what an MoE model has and a dense one has not, besides the experts: the gates' parameters
GATE_KEY = re.compile(r"(^|\.)(moe\.gate|moe_router)\.")


def dense_ffn_layers(model, state_dict: Dict[str, Tensor], prefix: str = "") -> Dict[str, Tuple[str, nn.Module]]:
    """The model's MoE layers for which ``state_dict`` holds a dense FFN
    (``decoder.layers.1.fc1.weight`` ...) instead of experts: ``{"decoder.1": (the layer's key
    prefix, e.g. "decoder.layers.1.", its MoE FFN)}``, in layer order."""
    found = {}
    for name, moe in model.moe_layers():
        side, index = name.split(".")
        keys = f"{prefix}{side}.layers.{index}."
        if keys + "fc1.weight" in state_dict:
            found[name] = (keys, moe)
    return found


def upcycle_state_dict(model, state_dict: Dict[str, Tensor], prefix: str = "") -> None:
    """In place: a dense model's ``state_dict`` becomes one for ``model`` (a
    :class:`~taskmoe_fairseq.models.taskmoe_transformer.TaskMoeTransformerModel`). Each MoE layer's
    experts (``<side>.layers.<i>.moe.experts.fc1_weight`` ``[E, ffn, C]`` ...) are copies of the
    dense layer's ``fc1``/``fc2`` (``[ffn, C]``, ``[ffn]``, ``[C, ffn]``, ``[C]``); the gate parameters the dense
    model has not (token gates' ``wg``, the router's task and sentence gates) are ``model``'s own,
    as initialised. A state dict that already holds experts is left as it is (a resumed run).

    Raises:
        TaskMoeError: a weight whose shape differs from the model's, or a weight the model needs
            that the dense state dict lacks (the dense model must have this model's sizes).
    """
    layers = dense_ffn_layers(model, state_dict, prefix)
    if not layers:
        return
    for keys, moe in layers.values():
        for param, stacked in zip(FFN_PARAMS, STACKED_NAMES):
            dense = state_dict.pop(keys + param)
            state_dict[f"{keys}moe.experts.{stacked}"] = dense.unsqueeze(0).repeat(len(moe.experts), *([1] * dense.dim()))
    for key, value in model.state_dict().items():
        loaded = state_dict.get(prefix + key)
        if loaded is None and GATE_KEY.search(key):
            loaded = state_dict[prefix + key] = value.detach().clone()
        if loaded is None:
            raise usage_error(f"--moe-upcycle: the dense checkpoint has no {key}; it must be this model "
                              "with --encoder-moe-freq 0 --decoder-moe-freq 0 and the same sizes")
        if tuple(loaded.shape) != tuple(value.shape):
            raise usage_error(f"--moe-upcycle: {key} is {list(loaded.shape)} in the dense checkpoint and "
                              f"{list(value.shape)} here; train the dense model with this model's sizes")


def check_dense_checkpoint(model, state_dict: Dict[str, Tensor], prefix: str = "") -> None:
    """Without ``--moe-upcycle``: a dense FFN where the model has experts is one line, not
    torch's list of missing and unexpected keys.

    Raises:
        TaskMoeError: ``state_dict`` has a dense FFN in one of the model's MoE layers.
    """
    layers = dense_ffn_layers(model, state_dict, prefix)
    if layers:
        raise usage_error(f"the checkpoint has a dense FFN where this model has experts ({', '.join(layers)}): "
                          "add --moe-upcycle to start every expert from it (sparse upcycling), or load it "
                          "with --encoder-moe-freq 0 --decoder-moe-freq 0")
