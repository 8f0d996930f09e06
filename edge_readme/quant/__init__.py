"""Weight formats: how each weight is held and computed (`--weights q4|q8|bf16|f16|f32`).

`model.py` calls `linear(x, w)` and `embedding(ids, w)` and never asks which format `w` is in.
This package decides, per tensor and device, which form a weight takes, and counts its bytes
exactly (the memory plan uses `planned_nbytes`, which equals the built weight's `nbytes`).

- q4: int4 group-wise (32) projections, GGUF 4-bit grids kept exactly; embeddings and a tied head
  as int8 rows; an FFN down projection that is not already 4-bit (a refit one) as int8 too: at
  4 bits the default MoE's shared down projections alone cost 10% held-out perplexity (measured:
  25.06 against 22.84 with them in int8, 22.84 in float32). The residual stream, norms,
  attention and KV cache stay float32 on the CPU; only a matmul's input and its scales are in the
  kernels' activation dtype: bfloat16 where the CPU's kernels are fast with it (`kernels.py`:
  measured, not assumed), else float32. All bfloat16 on CUDA.
- q8: int8 projections, one scale per row; CPU only; activations as for q4.
- bf16, f16, f32: plain tensors in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_readme.errors import EdgeReadmeError
from edge_readme.loader import Rows

from . import q4, q8
from .q4 import Q4Weight
from .q8 import Q8Weight

WEIGHT_FORMATS = ("q4", "q8", "bf16", "f16", "f32")
_ALIASES = {"int8": "q8", "int4": "q4", "float32": "f32", "fp32": "f32", "bfloat16": "bf16",
            "float16": "f16", "fp16": "f16"}
_FLOAT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
Weight = torch.Tensor | Q4Weight | Q8Weight  # and FileRows, for a lookup table left on disk


def parse_format(name: str) -> str:
    fmt = _ALIASES.get(name, name)
    if fmt not in WEIGHT_FORMATS:
        raise EdgeReadmeError(f"--weights: unknown format {name!r}; use one of "
                              f"{', '.join(WEIGHT_FORMATS)}")
    return fmt


def default_format(device: torch.device) -> str:
    """q4 on the CPU (fastest and smallest there, see README 'Weight formats'); f16 elsewhere."""
    return "q4" if device.type == "cpu" else "f16"


def check_device(fmt: str, device: torch.device) -> None:
    if fmt == "q8" and device.type != "cpu":
        raise EdgeReadmeError(f"--weights q8 runs on the CPU only; on {device.type} use q4 "
                              "(CUDA sm80 or newer) or f16")
    if fmt == "q4" and device.type == "mps":
        raise EdgeReadmeError("--weights q4 has no MPS kernel; use f16 on mps")
    if fmt == "q4" and device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            raise EdgeReadmeError("--weights q4 on CUDA needs compute capability 8.0 or newer "
                                  "(the int4 kernel); use f16 on this GPU")


def compute_dtype(fmt: str, device: torch.device) -> torch.dtype:
    """The dtype of the residual stream, norms, attention and KV cache."""
    if fmt in _FLOAT:
        return _FLOAT[fmt]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def kv_dtype(fmt: str, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: the kernels' activation dtype for q4/q8 (bfloat16 where it is fast:
    half the bytes of the largest buffer at long contexts), else the compute dtype."""
    return act_dtype(fmt, device)


def act_dtype(fmt: str, device: torch.device) -> torch.dtype:
    """The dtype quantized kernels take their input (and scales) in."""
    if fmt in _FLOAT or device.type != "cpu":
        return compute_dtype(fmt, device)
    from .kernels import cpu_activation_dtype

    return cpu_activation_dtype()


def weight_form(fmt: str, shape: tuple[int, ...], role: str, device: torch.device,
                four_bit: bool = False) -> str:
    """'q4', 'q8' or 'float': the form a tensor of `shape` takes. role: 'proj', 'down' (an FFN
    down projection) or 'embed'; four_bit: the tensor already holds 4-bit values."""
    if fmt in _FLOAT or len(shape) != 2:
        return "float"
    if role == "embed":  # looked up by row; also the tied head
        return "q8" if device.type == "cpu" and q8.eligible(shape) else "float"
    if fmt == "q4" and q4.eligible(shape) and (role != "down" or four_bit
                                               or device.type != "cpu"):
        return "q4"
    if device.type == "cpu" and q8.eligible(shape):
        return "q8"
    return "float"


def planned_nbytes(fmt: str, shape: tuple[int, ...], role: str, device: torch.device,
                   four_bit: bool = False) -> int:
    """Bytes `convert` will hold for a tensor of `shape`: the memory plan's count."""
    dt = act_dtype(fmt, device)
    form = weight_form(fmt, shape, role, device, four_bit)
    numel = 1
    for n in shape:
        numel *= n
    if form == "q4":
        N, K = shape
        return N * K // 2 + (K // q4.GROUP) * N * 2 * dt.itemsize
    if form == "q8":
        return numel + shape[0] * dt.itemsize
    return numel * dt.itemsize


def convert(w: torch.Tensor | Rows, fmt: str, role: str, device: torch.device) -> Weight:
    """A float weight -> its held form on `device` (quantized on the CPU, then moved). w may be
    a `Rows` source (a big table read a block at a time): no whole float copy is made."""
    whole = isinstance(w, torch.Tensor)
    form = weight_form(fmt, tuple(w.shape), role, device, whole and four_bit(fmt, w, role))
    if form == "q4":  # the quantizers read a tensor or Rows a chunk at a time
        return Q4Weight.quantize(w, torch.float32).to(device) if device.type != "cpu" \
            else Q4Weight.quantize(w, act_dtype(fmt, device))
    if form == "q8":
        return Q8Weight.quantize(w, act_dtype(fmt, device))
    dtype = compute_dtype(fmt, device)
    if not whole:
        return torch.cat([b.to(device=device, dtype=dtype) for b in w.blocks()])
    return w.to(device=device, dtype=dtype).contiguous()


def four_bit(fmt: str, w: torch.Tensor, role: str) -> bool:
    """Only q4's down projections ask (the check reads a few rows)."""
    return fmt == "q4" and role == "down" and q4.on_grid(w)


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return w(x)


class FileRows:
    """A lookup table left in the model file (`rowfile.RowFile`): each lookup reads its rows and
    gives exactly what the in-memory table of format `fmt` would (int8 rows are quantized per
    row, so one row quantized alone equals that row of the whole table). Holds no weight bytes."""

    nbytes = 0

    def __init__(self, source, fmt: str, device: torch.device):
        self.source, self.shape = source, tuple(source.shape)
        self.form = weight_form(fmt, self.shape, "embed", device)
        self.fmt, self.device = fmt, device

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1).tolist()
        uniq = sorted(set(flat))
        block = torch.from_numpy(self.source.read(uniq))
        if self.form == "q8":
            block = Q8Weight.quantize(block, act_dtype(self.fmt, self.device)).rows(
                torch.arange(len(uniq)))
        else:
            block = block.to(compute_dtype(self.fmt, self.device))
        where = {t: i for i, t in enumerate(uniq)}
        out = block[torch.tensor([where[t] for t in flat], dtype=torch.long)]
        return out.to(device=self.device, dtype=dtype).view(*ids.shape, self.shape[1])

    def close(self) -> None:
        self.source.close()


def embedding(ids: torch.Tensor, w: Weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, FileRows):
        return w.rows(ids, dtype)
    if isinstance(w, Q8Weight):
        return w.rows(ids).to(dtype)
    return F.embedding(ids, w)


def nbytes(w: Weight) -> int:
    return w.nbytes if not isinstance(w, torch.Tensor) else w.numel() * w.element_size()


__all__ = ["FileRows", "Q4Weight", "Q8Weight", "WEIGHT_FORMATS", "Weight", "act_dtype",
           "check_device", "compute_dtype", "four_bit", "kv_dtype",
           "convert", "default_format", "embedding", "linear", "nbytes", "parse_format",
           "planned_nbytes", "weight_form"]
