"""Int8 weight-only linear for CPU decode: per-row scales, `torch.ops.aten._weight_int8pack_mm`.

`Int8Weight` stands in for a [out, in] weight Parameter; `F.linear(x, w)` on it dispatches to the
int8 kernel, so the model file needs no change. It knows nothing of files or of the model's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Weight(torch.Tensor):
    """A weight held as int8 [out, in] plus scales [out]; F.linear on it runs the int8 kernel."""

    @staticmethod
    def __new__(cls, w: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16):
        wf = w.detach().float()
        scale = wf.abs().amax(-1).clamp(min=1e-12) / 127.0  # [out]
        q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self = torch.Tensor._make_subclass(cls, torch.empty(0, dtype=compute_dtype), False)
        self.q, self.scale, self.out_shape = q, scale.to(compute_dtype), w.shape
        return self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear:
            x, w = args[0], args[1]
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, x.shape[-1]).to(w.scale.dtype), w.q, w.scale)
            return y.reshape(*x.shape[:-1], -1)
        raise NotImplementedError(f"Int8Weight supports F.linear only, not {func}")


def quantize_linears_int8(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every 2-D weight of the transformer blocks by an Int8Weight; returns how many."""
    n = 0
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 2 and name in ("wqkv", "wo", "w_gate_up", "w_down"):
                delattr(mod, name)
                setattr(mod, name, Int8Weight(p, compute_dtype))
                n += 1
    return n
