"""GGUF bytes for hostile-file tests: parse a real file into typed parts, edit them, write bytes.

Types are kept (unlike the library's reader), so a test can change one value, one type or one
count and write the file again byte by byte.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFParts:
    version: int = 3
    kvs: list[list[Any]] = field(default_factory=list)  # [key, vtype, value]; arrays: (itype, [])
    tensors: list[list[Any]] = field(default_factory=list)  # [name, dims, qtype, rel offset]
    data: bytes = b""
    align: int = 32

    def get(self, key: str) -> list[Any]:
        return next(kv for kv in self.kvs if kv[0] == key)

    def set(self, key: str, vtype: int, value: Any) -> "GGUFParts":
        for kv in self.kvs:
            if kv[0] == key:
                kv[1], kv[2] = vtype, value
                return self
        self.kvs.append([key, vtype, value])
        return self

    def drop(self, key: str) -> "GGUFParts":
        self.kvs = [kv for kv in self.kvs if kv[0] != key]
        return self


def _read(buf: bytes, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in SCALARS:
        fmt = "<" + SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == STRING:
        n = struct.unpack_from("<Q", buf, pos)[0]
        return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n
    itype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    items = []
    for _ in range(count):
        v, pos = _read(buf, pos, itype)
        items.append(v)
    return (itype, items), pos


def parse(buf: bytes) -> GGUFParts:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, parts = 24, GGUFParts(version=version)
    for _ in range(n_kv):
        key, pos = _read(buf, pos, STRING)
        vtype = struct.unpack_from("<I", buf, pos)[0]
        value, pos = _read(buf, pos + 4, vtype)
        parts.kvs.append([key, vtype, value])
        if key == "general.alignment":
            parts.align = value
    for _ in range(n_tensors):
        name, pos = _read(buf, pos, STRING)
        n_dims = struct.unpack_from("<I", buf, pos)[0]
        dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        qtype, off = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        parts.tensors.append([name, dims, qtype, off])
    start = -(-pos // parts.align) * parts.align
    parts.data = buf[start:]
    return parts


def encode_value(vtype: int, value: Any) -> bytes:
    if vtype == 6 and abs(value) > 3.4e38:  # float32 has no such finite value: its inf
        value = math.copysign(math.inf, value)
    if vtype in SCALARS:
        return struct.pack("<" + SCALARS[vtype], value)
    if vtype == STRING:
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        return struct.pack("<Q", len(raw)) + raw
    if isinstance(value, bytes):  # an array already encoded (deep nesting without recursion)
        return value
    itype, items = value
    return struct.pack("<IQ", itype, len(items)) + b"".join(encode_value(itype, v) for v in items)


def nested_array(depth: int) -> bytes:
    """An array of arrays `depth` levels deep around one uint32, encoded iteratively."""
    return struct.pack("<IQ", ARRAY, 1) * depth + struct.pack("<IQI", 4, 1, 1)


def build(parts: GGUFParts, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """GGUF bytes; n_tensors / n_kv override the header counts (to lie about them)."""
    out = [b"GGUF", struct.pack("<IQQ", parts.version,
                                len(parts.tensors) if n_tensors is None else n_tensors,
                                len(parts.kvs) if n_kv is None else n_kv)]
    for key, vtype, value in parts.kvs:
        out += [encode_value(STRING, key), struct.pack("<I", vtype), encode_value(vtype, value)]
    for name, dims, qtype, off in parts.tensors:
        out += [encode_value(STRING, name), struct.pack("<I", len(dims)),
                struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", qtype, off)]
    head = b"".join(out)
    align = parts.align if isinstance(parts.align, int) and parts.align > 0 else 32
    pad = -len(head) % align
    return head + b"\0" * pad + parts.data
