"""One validation layer for model metadata: GGUF keys, config.json, tokenizer fields, manifests.

Every check runs before anything is allocated from the values it checks, and every rejection is a
`ModelFormatError` naming the file, the field, the value found and what was expected. Files are
read only when they are regular files, and only up to a size limit (a FIFO or a symlink to
/dev/zero is refused at once). This module knows nothing about tensors' math or devices.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ModelFormatError

# Size limits for the small files beside the weights (bytes).
JSON_LIMIT = 16 << 20  # config.json, tokenizer_config.json, index, experts.json
TOKENIZER_JSON_LIMIT = 64 << 20
TEMPLATE_LIMIT = 1 << 20  # chat templates, from a file or from metadata

# Ranges wide enough for every released Llama-family model, narrow enough that nothing built from
# them (a list per layer, a table per position) can exhaust memory.
MAX_VOCAB = 1 << 24
MAX_HIDDEN = 1 << 16
MAX_FFN = 1 << 20
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_POSITION = 1 << 24
MAX_EXPERTS = 4096

_FIX = "re-export the model or download it again"


def fail(source: Any, field: str, value: Any, expected: str, fix: str = _FIX) -> ModelFormatError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ModelFormatError(f"{source}: field {field!r}: expected {expected}, found {shown}; {fix}")


# ---------------------------------------------------------------- files


def read_regular(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is a ModelFormatError.

    The file is opened non-blocking and checked with fstat, so a FIFO never blocks the reader and
    a device (/dev/zero behind a symlink) is never read.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing; expected the model's {what}") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot open the {what} ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFormatError(f"{path}: the {what} is not a regular file (a FIFO, device or "
                                   "socket); replace it with the real file")
        if st.st_size > limit:
            raise ModelFormatError(f"{path}: the {what} is {st.st_size} bytes; expected at most "
                                   f"{limit} bytes. Replace it with the model's real {what}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ModelFormatError(f"{path}: the {what} grew past {limit} bytes while read")
        return b"".join(chunks)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read the {what} ({e.strerror})") from None
    finally:
        os.close(fd)


def check_regular(path: str | os.PathLike, what: str = "file") -> int:
    """Size of `path` if it is a regular file (symlinks followed); else a ModelFormatError."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing; expected the model's {what}") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot stat the {what} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(f"{path}: the {what} is not a regular file (a FIFO, device, "
                               "folder or socket); replace it with the real file")
    return st.st_size


def read_text(path: str | os.PathLike, limit: int, what: str = "file") -> str:
    try:
        return read_regular(path, limit, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{path}: the {what} is not UTF-8 text ({e})") from None


def read_json(path: str | os.PathLike, limit: int = JSON_LIMIT, what: str = "JSON file",
              kind: type | None = dict) -> Any:
    """Parse a JSON file read through `read_regular`; `kind` is the type the top level must have."""
    text = read_text(path, limit, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e}); restore or regenerate "
                               "the file") from None
    except RecursionError:
        raise ModelFormatError(f"{path}: JSON nested too deeply; restore or regenerate "
                               "the file") from None
    if kind is not None and not isinstance(data, kind):
        raise ModelFormatError(f"{path}: expected a JSON {kind.__name__.replace('dict', 'object')}"
                               f" at the top level, found {type(data).__name__}; restore or "
                               "regenerate the file")
    return data


def inside(folder: Path, name: Any, source: Any, field: str) -> Path:
    """folder / name, refused unless `name` is a relative path that stays inside `folder`."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise fail(source, field, name, "a file name inside the model folder")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise fail(source, field, name, "a relative file name inside the model folder",
                   "a model's files may not point outside its folder")
    full = folder / p
    try:
        resolved, root = full.resolve(), folder.resolve()
    except (OSError, RuntimeError, ValueError):  # ValueError: lone surrogates in the name
        raise fail(source, field, name, "a file name that resolves") from None
    if resolved != root and root not in resolved.parents:
        raise fail(source, field, name, f"a file inside {folder}",
                   "a model's files may not link outside its folder")
    return full


# ---------------------------------------------------------------- values


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def as_int(source: Any, field: str, v: Any, lo: int, hi: int) -> int:
    if not is_int(v) or not lo <= v <= hi:
        raise fail(source, field, v, f"an integer in [{lo}, {hi}]")
    return v


def as_float(source: Any, field: str, v: Any, lo: float, hi: float,
             open_lo: bool = True) -> float:
    ok = (is_int(v) or isinstance(v, float)) and math.isfinite(v) \
        and (lo < v if open_lo else lo <= v) and v <= hi
    if not ok:
        bracket = "(" if open_lo else "["
        raise fail(source, field, v, f"a finite number in {bracket}{lo:g}, {hi:g}]")
    return float(v)


def optional(check, source: Any, field: str, v: Any, *args) -> Any:
    return None if v is None else check(source, field, v, *args)


def token_id(source: Any, field: str, v: Any, vocab: int) -> int | None:
    if v is None:
        return None
    return as_int(source, field, v, 0, vocab - 1)


# ---------------------------------------------------------------- config.json


_HF_INTS = {  # key: (low, high, required)
    "vocab_size": (1, MAX_VOCAB, True),
    "hidden_size": (1, MAX_HIDDEN, True),
    "intermediate_size": (1, MAX_FFN, True),
    "num_hidden_layers": (1, MAX_LAYERS, True),
    "num_attention_heads": (1, MAX_HEADS, True),
    "num_key_value_heads": (1, MAX_HEADS, False),
    "head_dim": (2, MAX_HEAD_DIM, False),
    "max_position_embeddings": (1, MAX_POSITION, False),
}


def check_hf_config(d: Any, source: Any) -> None:
    """Types and ranges of a config.json's fields, before ModelConfig is built from them."""
    if not isinstance(d, Mapping):
        raise ModelFormatError(f"{source}: expected a JSON object, found {type(d).__name__}; "
                               "expected a Hugging Face Llama config.json")
    for key, (lo, hi, required) in _HF_INTS.items():
        if d.get(key) is None and required:
            raise ModelFormatError(f"{source}: missing field {key!r}; "
                                   "expected a Hugging Face Llama config.json")
        if d.get(key) is not None:
            as_int(source, key, d[key], lo, hi)
    if "rope_theta" in d:
        as_float(source, "rope_theta", d["rope_theta"], 0, 1e12)
    if "rms_norm_eps" in d:
        as_float(source, "rms_norm_eps", d["rms_norm_eps"], 0, 1)
    if "tie_word_embeddings" in d and not isinstance(d["tie_word_embeddings"], bool):
        raise fail(source, "tie_word_embeddings", d["tie_word_embeddings"], "true or false")
    vocab = d["vocab_size"]
    token_id(source, "bos_token_id", d.get("bos_token_id"), vocab)
    eos = d.get("eos_token_id")
    for i, x in enumerate(eos if isinstance(eos, list) else [eos]):
        token_id(source, "eos_token_id" + (f"[{i}]" if isinstance(eos, list) else ""), x, vocab)
    heads = d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    if heads % kv:
        raise fail(source, "num_key_value_heads", kv, f"a divisor of num_attention_heads ({heads})")
    if d.get("head_dim") is None and d["hidden_size"] % heads:
        raise fail(source, "num_attention_heads", heads,
                   f"a divisor of hidden_size ({d['hidden_size']}) when head_dim is not given")
    moe = d.get("moe")
    if moe is not None:
        check_moe(moe, source, d["num_hidden_layers"])


_ROUTER_INTS = {"dim": (1, MAX_HIDDEN), "num_layers": (1, 64), "num_heads": (1, MAX_HEADS),
                "ffn_dim": (1, MAX_FFN), "max_position": (1, MAX_POSITION)}


def check_moe(moe: Any, source: Any, num_layers: int) -> None:
    if not isinstance(moe, Mapping):
        raise fail(source, "moe", moe, "an object with the Read-ME MoE fields")
    if "num_experts" not in moe:
        raise ModelFormatError(f"{source}: missing field 'moe.num_experts'; re-run the refactor")
    as_int(source, "moe.num_experts", moe["num_experts"], 1, MAX_EXPERTS)
    routing = moe.get("routing", "global")
    if routing not in ("global", "per_layer"):
        raise fail(source, "moe.routing", routing, "'global' or 'per_layer'")
    shared = moe.get("shared_sizes", [])  # the model builds one shared expert per layer
    if not isinstance(shared, list) or len(shared) != num_layers:
        raise fail(source, "moe.shared_sizes", shared,
                   f"a list of {num_layers} integers (one per layer)")
    for i, s in enumerate(shared):
        as_int(source, f"moe.shared_sizes[{i}]", s, 0, MAX_FFN)
    for key in ("expert_file", "manifest_file"):
        if key in moe and (not isinstance(moe[key], str) or "/" in moe[key]
                           or moe[key] in ("", ".", "..")):
            raise fail(source, f"moe.{key}", moe[key], "a file name in the model folder")
    domains = moe.get("domains", [])
    if not isinstance(domains, list) or not all(isinstance(x, str) for x in domains):
        raise fail(source, "moe.domains", domains, "a list of strings")
    router = moe.get("router", {})
    if not isinstance(router, Mapping):
        raise fail(source, "moe.router", router, "an object")
    for key, (lo, hi) in _ROUTER_INTS.items():
        if key in router:
            as_int(source, f"moe.router.{key}", router[key], lo, hi)
    if "rope_theta" in router:
        as_float(source, "moe.router.rope_theta", router["rope_theta"], 0, 1e12)
    dim, heads = router.get("dim", 64), router.get("num_heads", 4)
    if dim % heads or (dim // heads) % 2:
        raise fail(source, "moe.router.num_heads", heads,
                   f"a divisor of moe.router.dim ({dim}) leaving an even head size")


def check_config(c: Any, source: Any) -> Any:
    """Cross-field consistency of a built ModelConfig (whatever file it came from)."""
    if c.num_heads % c.num_kv_heads:
        raise fail(source, "num_key_value_heads", c.num_kv_heads,
                   f"a divisor of the head count ({c.num_heads})")
    if c.head_dim % 2:
        raise fail(source, "head_dim", c.head_dim, "an even number (RoPE rotates pairs)")
    for i, x in enumerate(c.eos_token_ids):
        token_id(source, f"eos_token_id[{i}]", x, c.vocab_size)
    token_id(source, "bos_token_id", c.bos_token_id, c.vocab_size)
    return c


# ---------------------------------------------------------------- GGUF metadata


def check_gguf(fields: Mapping[str, Any], tensor_names: Iterable[str], source: Any) -> None:
    """Types, ranges and cross-consistency of a GGUF's model and tokenizer keys."""
    from .config import SUPPORTED_ARCHITECTURES

    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        return  # ModelConfig.from_gguf_fields names the architectures it runs
    ints = {"block_count": (1, MAX_LAYERS, True), "embedding_length": (1, MAX_HIDDEN, True),
            "feed_forward_length": (1, MAX_FFN, True),
            "attention.head_count": (1, MAX_HEADS, True),
            "attention.head_count_kv": (1, MAX_HEADS, False),
            "attention.key_length": (2, MAX_HEAD_DIM, False),
            "rope.dimension_count": (2, MAX_HEAD_DIM, False),
            "context_length": (1, MAX_POSITION, False), "vocab_size": (1, MAX_VOCAB, False)}
    for key, (lo, hi, required) in ints.items():
        name = f"{arch}.{key}"
        if name not in fields:
            if required:
                raise ModelFormatError(f"{source}: GGUF metadata key {name} is missing; {_FIX}")
            continue
        as_int(source, name, fields[name], lo, hi)
    for key, lo, hi in (("rope.freq_base", 0, 1e12), ("attention.layer_norm_rms_epsilon", 0, 1)):
        if f"{arch}.{key}" in fields:
            as_float(source, f"{arch}.{key}", fields[f"{arch}.{key}"], lo, hi)
    hidden, heads = fields[f"{arch}.embedding_length"], fields[f"{arch}.attention.head_count"]
    explicit = f"{arch}.attention.key_length" in fields or f"{arch}.rope.dimension_count" in fields
    if not explicit and hidden % heads:
        raise fail(source, f"{arch}.attention.head_count", heads,
                   f"a divisor of {arch}.embedding_length ({hidden})")
    kv = fields.get(f"{arch}.attention.head_count_kv", heads)
    if heads % kv:
        raise fail(source, f"{arch}.attention.head_count_kv", kv,
                   f"a divisor of {arch}.attention.head_count ({heads})")
    blocks = fields[f"{arch}.block_count"]
    found = {int(m.group(1)) for n in tensor_names if (m := re.match(r"blk\.(\d+)\.", n))}
    if found and (max(found) >= blocks or len(found) != blocks):
        raise fail(source, f"{arch}.block_count", blocks,
                   f"the number of blocks that have tensors ({len(found)}, highest index "
                   f"{max(found)})")
    if "tokenizer.ggml.tokens" in fields:
        check_gguf_tokenizer(fields, source)
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = fields.get(f"{arch}.vocab_size")
    if isinstance(tokens, list) and vocab is not None and len(tokens) > vocab:
        raise fail(source, f"{arch}.vocab_size", vocab,
                   f"at least the {len(tokens)} tokens of tokenizer.ggml.tokens")
    if "tokenizer.chat_template" in fields:
        t = fields["tokenizer.chat_template"]
        if not isinstance(t, str) or len(t) > TEMPLATE_LIMIT:
            raise fail(source, "tokenizer.chat_template", t,
                       f"a template string of at most {TEMPLATE_LIMIT} characters")


def check_gguf_tokenizer(fields: Mapping[str, Any], source: Any) -> None:
    """tokenizer.ggml.*: a list of unique strings, parallel lists, merges of known tokens."""
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise fail(source, "tokenizer.ggml.tokens", tokens, "a non-empty list of strings")
    if not 1 <= len(tokens) <= MAX_VOCAB:
        raise fail(source, "tokenizer.ggml.tokens", len(tokens), f"at most {MAX_VOCAB} tokens")
    n = len(tokens)
    vocab = set(tokens)
    if len(vocab) != n:
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise fail(source, "tokenizer.ggml.tokens", dup, "unique token strings (this one repeats)")
    for key, kind in (("tokenizer.ggml.scores", (int, float)), ("tokenizer.ggml.token_type", int)):
        v = fields.get(key)
        if v is None:
            continue
        if not isinstance(v, list) or len(v) != n or not all(
                isinstance(x, kind) and not isinstance(x, bool) for x in v):
            raise fail(source, key, v if not isinstance(v, list) else f"list of {len(v)}",
                       f"a list of {n} numbers, one per token")
        if key.endswith("scores") and not all(math.isfinite(x) for x in v):
            raise fail(source, key, "NaN or inf", "finite scores")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None:
        if not isinstance(merges, list):
            raise fail(source, "tokenizer.ggml.merges", merges, "a list of 'left right' strings")
        for i, m in enumerate(merges):
            parts = m.split(" ") if isinstance(m, str) else None
            if not parts or len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab \
                    or parts[0] + parts[1] not in vocab:
                raise fail(source, f"tokenizer.ggml.merges[{i}]", m,
                           "'left right' where left, right and left+right are tokens")
    model = fields.get("tokenizer.ggml.model")
    if model is not None and not isinstance(model, str):
        raise fail(source, "tokenizer.ggml.model", model, "'gpt2' or 'llama'")
    pre = fields.get("tokenizer.ggml.pre")
    if pre is not None and not isinstance(pre, str):
        raise fail(source, "tokenizer.ggml.pre", pre, "a pre-tokenizer name")
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id",
                "unknown_token_id"):
        token_id(source, f"tokenizer.ggml.{key}", fields.get(f"tokenizer.ggml.{key}"), n)
    for key in ("add_bos_token", "add_space_prefix", "add_eos_token"):
        v = fields.get(f"tokenizer.ggml.{key}")
        if v is not None and not isinstance(v, bool):
            raise fail(source, f"tokenizer.ggml.{key}", v, "true or false")


# ---------------------------------------------------------------- tensors


def check_layer_names(num_layers: int, names: Iterable[str], source: Any) -> None:
    """No tensor for a layer past num_layers: the layer count matches the tensors."""
    extra = sorted({int(m.group(1)) for n in names
                    if (m := re.match(r"model\.layers\.(\d+)\.", n))} - set(range(num_layers)))
    if extra:
        raise fail(source, "num_hidden_layers", num_layers,
                   f"a count covering every layer with tensors (found layer {extra[-1]})")


def check_finite_norms(tensors: Mapping[str, Any], source: Any) -> None:
    """NaN or inf in a norm weight poisons every token; report it at load (norms are small)."""
    import torch

    for name in tensors:  # names first: a lazy loader reads only the norms
        if name.endswith("norm.weight") and not bool(torch.isfinite(tensors[name]).all()):
            raise ModelFormatError(f"{source}: tensor {name} holds NaN or inf; expected finite "
                                   f"weights. {_FIX[0].upper() + _FIX[1:]}")
