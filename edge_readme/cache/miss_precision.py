"""Low-precision experts on a miss (`--miss-precision q2|q3|q4`, after HOBBIT).

`LowBitExperts` holds a low-bit copy of every routed expert, made at load time from the stored
expert (one pass over experts.safetensors through the ExpertStore), resident for the whole run.
`MissPrecision` is the expert provider the MoE layers call when the flag is on: an expert that is
resident in the cache is used as always; one that is not (or still in flight) is computed at once
from its low-bit copy, and its full load is queued on the prefetch thread for later tokens.
Only decode steps take that path (`active`); a prefill step waits for full experts, since its
loads are shared by many tokens and its errors would stay in the KV cache.

This is the one mode whose output may differ from the all-resident engine. CPU only: the copies
run on torch's int4 kernel (`quant/lowbit.py`); no other device has a counted miss path yet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from edge_readme.cache.expert_cache import ExpertCache
from edge_readme.cache.store import ExpertStore, aligned_empty
from edge_readme.errors import EdgeReadmeError
from edge_readme.experts_format import ExpertManifest, align_up
from edge_readme.model import ExpertWeights
from edge_readme.quant import experts as qexperts
from edge_readme.quant import lowbit

Key = tuple[int, int]


def _rows(manifest: ExpertManifest, key: Key) -> int:
    """Neurons of an expert, padded to 32 (zero neurons change nothing)."""
    entry = manifest.entry(*key)
    if manifest.expert_format == "q4":
        return qexperts.Layout.rows_of(entry.length, manifest.hidden_size)
    return qexperts.padded(entry.rows)


def check(manifest: ExpertManifest, device: torch.device) -> None:
    if device.type != "cpu":
        raise EdgeReadmeError(f"--miss-precision runs on the CPU only (its int4 kernel); on "
                              f"{device.type} leave it off")
    if not qexperts.supported(manifest.hidden_size):
        raise EdgeReadmeError(f"--miss-precision: hidden size {manifest.hidden_size} of "
                              f"{manifest.path} is not a multiple of 64; leave it off")


def copies_nbytes(manifest: ExpertManifest, precision: str) -> int:
    """Bytes of all low-bit copies (the memory plan adds them to the resident part)."""
    bits, D = lowbit.BITS[precision], manifest.hidden_size
    total = 0
    for e in manifest.entries:
        R = _rows(manifest, (e.layer, e.expert))
        total += lowbit.matrix_nbytes(bits, 2 * R, D) + lowbit.matrix_nbytes(bits, D, R)
    return total


def scratch_nbytes(manifest: ExpertManifest, kernel_dtype: torch.dtype) -> int:
    """The one expert's kernel form a miss builds: packed int4, scales, bit-plane scratch."""
    R = max(_rows(manifest, k) for k in manifest.keys())
    D = manifest.hidden_size
    sz = qexperts.Layout(R, D).scale_zero_numel() * kernel_dtype.itemsize
    return align_up(3 * R * D // 2) + align_up(sz) + align_up(2 * R * D // 8)


class LowBitExperts:
    """Every routed expert at `precision` bits, plus the buffers one miss computes in."""

    def __init__(self, store: ExpertStore, precision: str, kernel_dtype: torch.dtype,
                 progress: Callable[[str, float], None] | None = None):
        m = store.manifest
        self.precision, self.bits = precision, lowbit.BITS[precision]
        self.manifest = m
        buf = aligned_empty(ExpertStore.buffer_bytes(m))
        keys = m.keys()
        self.copies: dict[Key, tuple[lowbit.LowBitMatrix, lowbit.LowBitMatrix]] = {}
        for i, key in enumerate(keys):
            n = store.read_into(*key, buf)
            self.copies[key] = self._encode(buf[:n], _rows(m, key))
            if progress is not None:
                progress("miss copies", (i + 1) / len(keys))
        R, D = max(_rows(m, k) for k in keys), m.hidden_size
        self._packed = torch.empty(3 * R * D // 2, dtype=torch.uint8)
        self._sz = torch.empty(qexperts.Layout(R, D).scale_zero_numel(), dtype=kernel_dtype)
        self._tmp = torch.empty(2 * R * D // 8, dtype=torch.uint8)

    def _encode(self, raw: torch.Tensor, R: int) -> tuple[lowbit.LowBitMatrix, ...]:
        m, D = self.manifest, self.manifest.hidden_size
        if m.expert_format == "q4":
            views = qexperts.Layout(R, D).views(raw)
            if self.bits == 4:  # the file's own 4-bit values, kept exactly (copied out of buf)
                return tuple(lowbit.LowBitMatrix(views[p + "_q"].reshape(-1).clone(),
                                                 views[p + "_s"].t().clone(),  # copies:
                                                 views[p + "_m"].t().clone(), shape, 4,
                                                 lowbit.group_for(4, shape[1]))
                             for p, shape in (("gu", (2 * R, D)), ("dn", (D, R))))
            gate_up, down = qexperts.dequantize(views)
        else:
            w = raw.view(m.dtype).view(3, -1, D).float()  # [3, rows, D]
            rows = w.shape[1]
            gate_up = torch.zeros(2 * R, D)
            gate_up[:rows], gate_up[R:R + rows] = w[0], w[1]
            down = torch.zeros(D, R)
            down[:, :rows] = w[2].t()
        return (lowbit.LowBitMatrix.encode(gate_up, self.bits),
                lowbit.LowBitMatrix.encode(down, self.bits))

    @property
    def nbytes(self) -> int:
        held = sum(a.nbytes + b.nbytes for a, b in self.copies.values())
        return held + self._packed.nbytes + self._sz.nbytes + self._tmp.nbytes

    def weights(self, key: Key) -> ExpertWeights:
        """The expert's kernel form, in the shared buffers (valid until the next call)."""
        gu, dn = self.copies[key]
        split_p = gu.shape[0] * gu.shape[1] // 2
        split_s = gu.shape[1] // gu.group * gu.shape[0] * 2
        return ExpertWeights(
            gate_up=gu.kernel_into(self._packed[:split_p], self._sz[:split_s], self._tmp),
            down=dn.kernel_into(self._packed[split_p:], self._sz[split_s:], self._tmp))


class MissPrecision:
    """The MoE layers' expert provider with --miss-precision: the cache, else the low-bit copy."""

    def __init__(self, cache: ExpertCache, copies: LowBitExperts, loader):
        self.cache, self.copies, self.loader = cache, copies, loader
        self.active = False  # set per step by the runtime: decode steps only

    def get(self, layer: int, expert: int) -> contextlib.AbstractContextManager[ExpertWeights]:
        if not self.active:
            return self.cache.get(layer, expert)
        held = self.cache.try_get(layer, expert)
        if held is not None:
            return held
        self.loader.submit([(layer, expert)])  # the full expert, for later tokens
        return contextlib.nullcontext(self.copies.weights((layer, expert)))
