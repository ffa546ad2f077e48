"""Gate parameters and gate math stay float32 whatever the model's dtype.

``model.half()``, ``model.bfloat16()`` and fairseq's ``--fp16`` / ``--bf16`` /
``--memory-efficient-fp16`` convert every floating-point parameter. A task
gate's logits rounded to fp16 change the full model's expert weights (and
sometimes its experts) while the extracted checkpoint keeps the fp32 ones, so
full and extracted would disagree. Modules with this mixin follow device moves
but keep their floating-point tensors in float32 (fairseq's MoE branch and
fairscale's gates likewise compute in fp32).

Autocast (fairseq's ``--amp``, ``torch.autocast``) is the other way gate math could leave
float32: it runs ``linear`` in float16/bfloat16 whatever its inputs' dtype. Gates therefore
compute inside :func:`autocast_off`.
"""

import contextlib

import torch
import torch.nn as nn


def autocast_off(device: torch.device):
    """A context in which autocast is disabled for ``device``'s type (``cuda``, ``cpu``, ...),
    so float32 inputs give float32 results, as fairseq's ``--amp`` leaves float32 math to code
    that asks for it (``torch.autocast(device_type=..., enabled=False)``, torch's recipe for
    regions that need full precision). A device type without autocast (``meta``) gets a no-op
    context. Raises nothing."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class Float32Params(nn.Module):
    """Mixin for ``nn.Module``: ``_apply`` moves tensors but never changes a float32 dtype.

    ``float32_submodules``: whether submodules are kept float32 too (a gate's ``wg``
    Linear) or convert as usual (the experts of an extracted layer)."""

    float32_submodules = True

    def _apply(self, fn, recurse=True):
        if recurse and not self.float32_submodules:
            for module in self.children():
                module._apply(fn)
            recurse = False

        def keep_float32(tensor):
            moved = fn(tensor)
            if tensor.dtype == torch.float32 and moved.dtype != torch.float32:
                return tensor.to(device=moved.device)
            return moved

        return super()._apply(keep_float32, recurse)
