"""The on-disk expert format: `experts.safetensors` + `experts.json` in a model folder.

One tensor per (layer, expert) named `layers.{l}.experts.{e}`. Float experts (dtype float32,
bfloat16, float16) have shape [3, rows, D]: [0] gate_proj rows, [1] up_proj rows, [2] down_proj
columns transposed. q4 experts (dtype "q4") are one uint8 blob each, laid out as
`edge_readme.quant.experts` says (int4 group-wise, rows padded to 32 with zero neurons).
Every expert starts at a file offset aligned to 4096 (header padded with spaces, `__pad__.{k}`
uint8 tensors between experts), so one positioned read, or one O_DIRECT read, fetches one expert.
This module writes and validates the format; it does not read expert bytes (see cache/store.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from edge_readme.errors import ExpertFileError, ModelFormatError
from edge_readme.fsutil import atomic_write
from edge_readme.quant import experts as qexperts
from edge_readme.validate import JSON_LIMIT, inside, is_int, read_json

FORMAT = "edge-readme-experts/1"
TENSORS_FILE = "experts.safetensors"
MANIFEST_FILE = "experts.json"
ALIGNMENT = 4096

_DTYPES = {
    "float32": (torch.float32, "F32"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
}
Q4 = "q4"  # the manifest dtype of int4 group-wise experts
_REQUIRED = {
    "format": str, "file": str, "dtype": str, "hidden_size": int, "num_layers": int,
    "num_experts": int, "alignment": int, "experts": list,
}
_ENTRY_FIELDS = ("layer", "expert", "rows", "offset", "length", "sha256")

Key = tuple[int, int]


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


def tensor_name(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def dtype_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 or 'bfloat16' -> 'bfloat16'; 'q4' -> 'q4'; else ModelFormatError."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    name = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(name, name)
    if name not in _DTYPES and name != Q4:
        raise ModelFormatError(
            f"expert dtype: expected one of {sorted(_DTYPES) + [Q4]}, found {name!r}; "
            "convert the experts to a supported format (refactor --expert-format)"
        )
    return name


def torch_dtype(name: str) -> torch.dtype:
    name = dtype_name(name)
    return torch.uint8 if name == Q4 else _DTYPES[name][0]


def expert_nbytes(dt: str, rows: int, hidden: int) -> int:
    """Bytes of one expert of `rows` neurons in the file."""
    if dt == Q4:
        return qexperts.Layout(rows, hidden).nbytes
    return 3 * rows * hidden * torch_dtype(dt).itemsize


@dataclasses.dataclass(frozen=True)
class ExpertEntry:
    """Where one expert's bytes live: [offset, offset + length) of the tensors file."""

    layer: int
    expert: int
    rows: int
    offset: int
    length: int
    sha256: str

    @property
    def key(self) -> Key:
        return (self.layer, self.expert)


@dataclasses.dataclass(frozen=True)
class ExpertManifest:
    """A validated experts.json. `entries` are in file order; `entry()` looks one up."""

    folder: Path
    path: Path
    dtype: torch.dtype
    hidden_size: int
    num_layers: int
    num_experts: int
    alignment: int
    entries: tuple[ExpertEntry, ...]
    by_key: Mapping[Key, ExpertEntry] = dataclasses.field(repr=False, compare=False)
    expert_format: str = "float"  # "q4": int4 blobs; "float": [3, rows, D] in `dtype`

    def entry(self, layer: int, expert: int) -> ExpertEntry:
        found = self.by_key.get((layer, expert))
        if found is None:
            raise ExpertFileError(
                f"{self.folder / MANIFEST_FILE}: layer {layer} expert {expert} is not listed "
                f"(the model has {self.num_layers} layers x {self.num_experts} experts); "
                "check the router output or re-run the refactor",
                layer, expert,
            )
        return found

    def keys(self) -> list[Key]:
        return [e.key for e in self.entries]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def max_rows(self) -> int:
        return max(e.rows for e in self.entries)

    @property
    def max_length(self) -> int:
        return max(e.length for e in self.entries)


# ---- writer -------------------------------------------------------------------------------


def _check_expert(key: Key, t: torch.Tensor, hidden: int) -> None:
    if t.dim() != 3 or t.shape[0] != 3 or t.shape[1] < 1 or t.shape[2] != hidden:
        raise ModelFormatError(
            f"write_experts: layer {key[0]} expert {key[1]}: expected shape [3, rows, {hidden}], "
            f"found {list(t.shape)}; stack gate rows, up rows and down columns transposed"
        )


def _layout(experts: Mapping[Key, torch.Tensor], dt: str) -> tuple[dict, list]:
    """Safetensors header entries and [(key, rel_offset, nbytes)] with aligned expert offsets."""
    header: dict = {"__metadata__": {"format": FORMAT}}
    placed, end, pads = [], 0, 0
    for key in sorted(experts):
        shape = list(experts[key].shape)
        nbytes = expert_nbytes(dt, shape[1], shape[2])
        header[tensor_name(*key)] = {
            "dtype": "U8" if dt == Q4 else _DTYPES[dt][1],
            "shape": [nbytes] if dt == Q4 else shape, "data_offsets": [end, end + nbytes],
        }
        placed.append((key, end, nbytes))
        end += nbytes
        gap = align_up(end) - end
        if gap:
            header[f"__pad__.{pads}"] = {
                "dtype": "U8", "shape": [gap], "data_offsets": [end, end + gap],
            }
            pads += 1
            end += gap
    return header, placed


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """[3, rows, D] -> [3, rows padded to 32, D] with zero neurons (they add nothing)."""
    rows = qexperts.padded(t.shape[1])
    if rows == t.shape[1]:
        return t
    return torch.cat([t, t.new_zeros(3, rows - t.shape[1], t.shape[2])], dim=1)


def _encode(t: torch.Tensor, dt: str) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dt == Q4:
        return qexperts.encode(torch.cat([t[0], t[1]]).float(), t[2].t().float())
    return t.to(torch_dtype(dt)).contiguous().view(torch.uint8)


def _header_bytes(header: dict) -> bytes:
    """JSON header padded with spaces so that 8 + len(header) is a multiple of ALIGNMENT."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (align_up(8 + len(raw)) - 8 - len(raw))


def write_experts(
    folder: str | os.PathLike, experts: Mapping[Key, torch.Tensor], dtype: torch.dtype | str
) -> dict:
    """Write experts.safetensors + experts.json atomically; return the manifest dict."""
    if not experts:
        raise ModelFormatError("write_experts: no experts given; pass at least one (layer, expert)")
    folder, dt = Path(folder), dtype_name(dtype)
    hidden = next(iter(experts.values())).shape[-1]
    for key, t in experts.items():
        _check_expert(key, t, hidden)
    if dt == Q4:
        if not qexperts.supported(hidden):
            raise ModelFormatError(f"write_experts: q4 experts need a hidden size that is a "
                                   f"multiple of 64, found {hidden}; use --expert-format f16")
        experts = {k: _pad_rows(t) for k, t in experts.items()}
    header, placed = _layout(experts, dt)
    head = _header_bytes(header)
    data_start = 8 + len(head)
    entries = []

    def write(f) -> None:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key, rel, nbytes in placed:
            f.seek(data_start + rel)
            raw = _encode(experts[key], dt)
            view = memoryview(raw.numpy()).cast("B")
            f.write(view)
            entries.append({
                "layer": key[0], "expert": key[1], "rows": int(experts[key].shape[1]),
                "offset": data_start + rel, "length": nbytes,
                "sha256": hashlib.sha256(view).hexdigest(),
            })
        f.truncate(data_start + align_up(placed[-1][1] + placed[-1][2]))

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / TENSORS_FILE, write, mode="wb")
    manifest = {
        "format": FORMAT, "file": TENSORS_FILE, "dtype": dt, "hidden_size": int(hidden),
        "num_layers": max(k[0] for k in experts) + 1,
        "num_experts": max(k[1] for k in experts) + 1,
        "alignment": ALIGNMENT, "experts": entries,
    }
    text = json.dumps(manifest, indent=1).encode()
    atomic_write(folder / MANIFEST_FILE, lambda f: f.write(text), mode="wb")
    return manifest


# ---- reader -------------------------------------------------------------------------------


def _load_json(path: Path) -> dict:
    if not path.exists() and not path.is_symlink():
        raise ModelFormatError(
            f"{path}: file not found; expected the expert manifest written by the refactor tool "
            "(run the refactor, or pass the model folder that holds experts.json)"
        )
    return read_json(path, JSON_LIMIT, "expert manifest")


def _check_fields(path: Path, data: dict) -> None:
    for name, kind in _REQUIRED.items():
        value = data.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ModelFormatError(
                f"{path}: field {name!r}: expected {kind.__name__}, found {value!r}; "
                "re-run the refactor to rewrite the manifest"
            )
    if data["format"] != FORMAT:
        raise ModelFormatError(
            f"{path}: field 'format': expected {FORMAT!r}, found {data['format']!r}; "
            "this edge-readme reads only that version: re-run the refactor"
        )
    dtype_name(data["dtype"])
    limits = {"hidden_size": 1 << 16, "num_layers": 1024, "num_experts": 4096,
              "alignment": 1 << 20}
    for name, hi in limits.items():
        if not 1 <= data[name] <= hi:
            raise ModelFormatError(f"{path}: field {name!r}: expected an integer in [1, {hi}], "
                                   f"found {data[name]!r}; re-run the refactor")
    if data["alignment"] & (data["alignment"] - 1):
        raise ModelFormatError(f"{path}: field 'alignment': expected a power of two, found "
                               f"{data['alignment']!r}; re-run the refactor")


def _parse_entry(path: Path, raw: object, index: int) -> ExpertEntry:
    ok = isinstance(raw, dict) and all(
        isinstance(raw.get(f), str) if f == "sha256" else is_int(raw.get(f))
        for f in _ENTRY_FIELDS
    ) and raw["offset"] >= 0
    if not ok:
        raise ModelFormatError(
            f"{path}: experts[{index}]: expected an object with integer fields "
            f"layer, expert, rows, offset, length and a string sha256, found {raw!r}; "
            "re-run the refactor"
        )
    return ExpertEntry(**{f: raw[f] for f in _ENTRY_FIELDS})


def _entry_error(path: Path, e: ExpertEntry, what: str) -> ExpertFileError:
    return ExpertFileError(
        f"{path}: layer {e.layer} expert {e.expert}: {what}; re-run the refactor or re-download",
        e.layer, e.expert,
    )


def _check_entry(path: Path, data: dict, e: ExpertEntry) -> None:
    hidden, dt = data["hidden_size"], dtype_name(data["dtype"])
    if not (0 <= e.layer < data["num_layers"] and 0 <= e.expert < data["num_experts"]):
        raise _entry_error(
            path, e, f"index out of range: expected layer < {data['num_layers']} "
            f"and expert < {data['num_experts']}",
        )
    if dt == Q4 and (e.rows % qexperts.GROUP or not qexperts.supported(hidden)):
        raise _entry_error(path, e, f"q4 experts need rows a multiple of 32 and a hidden size "
                           f"a multiple of 64, found rows {e.rows}, hidden {hidden}")
    if e.rows < 1 or e.length != expert_nbytes(dt, e.rows, hidden):
        raise _entry_error(
            path, e, f"expected length {expert_nbytes(dt, max(e.rows, 0), hidden)} bytes for "
            f"{e.rows} rows x hidden {hidden} in format {dt}, found {e.length}",
        )
    if e.offset % data["alignment"]:
        raise _entry_error(
            path, e, f"offset {e.offset} is not aligned to {data['alignment']} bytes"
        )


def _read_st_header(path: Path) -> tuple[dict, int]:
    """(safetensors header, absolute offset of its data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if size < 2 or size > 100_000_000:
            raise ModelFormatError(
                f"{path}: expected an 8-byte safetensors header length, found {raw!r}; "
                "the file is not safetensors or is truncated: re-run the refactor"
            )
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ModelFormatError(f"{path}: safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header: expected a JSON object, found "
                               f"{type(header).__name__}; re-run the refactor")
    return header, 8 + size


def _check_against_header(
    path: Path, header: dict, data_start: int, data: dict, e: ExpertEntry
) -> None:
    q4 = dtype_name(data["dtype"]) == Q4
    want = {
        "dtype": "U8" if q4 else _DTYPES[dtype_name(data["dtype"])][1],
        "shape": [e.length] if q4 else [3, e.rows, data["hidden_size"]],
        "data_offsets": [e.offset - data_start, e.offset - data_start + e.length],
    }
    found = header.get(tensor_name(e.layer, e.expert))
    if not isinstance(found, dict) or any(found.get(k) != v for k, v in want.items()):
        raise _entry_error(
            path, e, f"tensor {tensor_name(e.layer, e.expert)!r}: expected {want} "
            f"(from {MANIFEST_FILE}), found {found}",
        )


def read_manifest(folder: str | os.PathLike) -> ExpertManifest:
    """Load and validate experts.json against experts.safetensors (size, offsets, shapes)."""
    folder = Path(folder)
    json_path = folder / MANIFEST_FILE
    data = _load_json(json_path)
    _check_fields(json_path, data)
    entries = tuple(_parse_entry(json_path, raw, i) for i, raw in enumerate(data["experts"]))
    if not entries:
        raise ModelFormatError(f"{json_path}: field 'experts' is empty; re-run the refactor")
    by_key: dict[Key, ExpertEntry] = {}
    for e in entries:
        _check_entry(json_path, data, e)
        if e.key in by_key:
            raise _entry_error(json_path, e, "listed twice")
        by_key[e.key] = e
    st_path = inside(folder, data["file"], json_path, "file")
    _check_tensors_file(st_path, data, entries)
    return ExpertManifest(
        folder=folder, path=st_path, dtype=torch_dtype(data["dtype"]),
        hidden_size=data["hidden_size"], num_layers=data["num_layers"],
        num_experts=data["num_experts"], alignment=data["alignment"],
        entries=entries, by_key=by_key,
        expert_format=Q4 if dtype_name(data["dtype"]) == Q4 else "float",
    )


def _check_tensors_file(path: Path, data: dict, entries: tuple[ExpertEntry, ...]) -> None:
    if not path.is_file():
        first = entries[0]
        raise ExpertFileError(
            f"{path}: file not found; {MANIFEST_FILE} lists {len(entries)} experts in it "
            f"(first: layer {first.layer} expert {first.expert}); restore the file or re-run "
            "the refactor",
            first.layer, first.expert,
        )
    size = path.stat().st_size
    for e in entries:
        if e.offset + e.length > size:
            raise _entry_error(
                path, e, f"truncated file: expected at least {e.offset + e.length} bytes "
                f"(offset {e.offset} + length {e.length}), found {size}",
            )
    header, data_start = _read_st_header(path)
    for e in entries:
        _check_against_header(path, header, data_start, data, e)


def load_float_experts(folder: str | os.PathLike) -> dict[Key, torch.Tensor]:
    """Every expert as float32 [3, rows, D] (q4 ones decoded exactly), for offline tools."""
    from safetensors import safe_open

    m = read_manifest(folder)
    out = {}
    with safe_open(str(m.path), framework="pt") as f:
        for e in m.entries:
            t = f.get_tensor(tensor_name(e.layer, e.expert))
            if m.expert_format == Q4:
                gu, dn = qexperts.dequantize(qexperts.Layout(e.rows, m.hidden_size).views(t))
                t = torch.cat([gu, dn.t()]).view(3, e.rows, m.hidden_size)
            out[e.key] = t.float()
    return out
