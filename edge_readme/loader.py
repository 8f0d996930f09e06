"""Read Llama- and Qwen2-architecture weights from a GGUF file or a Hugging Face folder.

Weights come out as `(name, float32 tensor)` pairs under Hugging Face names, whatever the file held;
GGUF's permuted q/k rows are put back in Hugging Face order. This module knows nothing about
devices, dtypes of compute, or experts.

The weights are not read at load: `LoadedModel.tensors` is a `LazyTensors` mapping that knows every
name and shape from the file's header and dequantizes a tensor only when it is looked up (and keeps
no copy). The runtime converts each weight to its format as it builds, so a 4-bit model never has a
float32 copy of the whole file in memory, only of the tensor being converted.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import validate
from .config import ModelConfig
from .errors import ModelFormatError
from .rowfile import RowFile, safetensors_rows

GGUF_MAGIC = b"GGUF"

# GGUF tensor name -> Hugging Face name ("{i}" is the block index).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_GGUF_PATTERNS = [
    (re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v)
    for k, v in GGUF_NAMES.items()
]


@dataclass
class TokenizerSpec:
    """What a tokenizer needs, from GGUF metadata or a tokenizer.json file."""

    kind: str  # "gguf" or "hf"
    tokenizer_json: str | None = None
    model: str = ""  # gguf: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str = ""
    tokens: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    token_types: list[int] | None = None
    merges: list[str] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool = False
    add_space_prefix: bool = False


class LazyTensors(Mapping):
    """Name -> float tensor, read (and dequantized) on each lookup; shapes known up front.

    A lookup returns a fresh tensor that nothing else holds, so dropping it frees it. Code that
    needs many passes over the weights (refactoring, calibration) takes `dict(tensors)` once."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], fetch: Callable[..., torch.Tensor],
                 row_files: dict[str, RowFile] | None = None):
        # fetch(name) or fetch(name, start, stop); its closure holds the open files
        self._shapes, self._fetch = shapes, fetch
        self._row_files = row_files or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        return self._fetch(name)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def rows(self, name: str) -> "Rows":
        return Rows(self._shapes[name], lambda a, b: self._fetch(name, a, b))

    def row_file(self, name: str) -> RowFile | None:
        """Where the matrix's rows lie in its file, if they can be read one at a time there
        (plain floats or GGUF blocks, not permuted or split): see `rowfile`."""
        return self._row_files.get(name)


class Rows:
    """A matrix handed out a block of rows at a time: an embedding table or output head of
    150k rows is never whole in float32 while it is converted to its format."""

    BLOCK = 2048  # a multiple of 64: the int4 layout packs rows in blocks of 64

    def __init__(self, shape: tuple[int, ...], fetch: Callable[[int, int], torch.Tensor]):
        self.shape, self._fetch = tuple(shape), fetch

    def blocks(self) -> Iterator[torch.Tensor]:
        for a in range(0, self.shape[0], self.BLOCK):
            yield self._fetch(a, min(a + self.BLOCK, self.shape[0]))


def row_source(tensors: Mapping[str, Any], name: str) -> "torch.Tensor | Rows":
    """A plain (unpermuted, unconcatenated) matrix as row blocks where the loader can, else
    the tensor."""
    return tensors.rows(name) if isinstance(tensors, LazyTensors) else tensors[name]


def row_file(tensors: Mapping[str, Any], name: str) -> RowFile | None:
    return tensors.row_file(name) if isinstance(tensors, LazyTensors) else None


def shape_of(tensors: Mapping[str, Any], name: str) -> tuple[int, ...]:
    """A weight's shape without reading it, where the mapping knows it (`LazyTensors`)."""
    if isinstance(tensors, LazyTensors):
        return tensors.shape(name)
    return tuple(tensors[name].shape)


@dataclass
class LoadedModel:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: TokenizerSpec
    chat_template: str | None
    path: Path


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a `.gguf` file or a Hugging Face model folder (`refactor`'s MoE folders included)."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or folder; pass a .gguf file, a model folder "
                               "or a registry name (see `edge-readme pull --list`)")
    if p.is_dir():
        return _load_hf_folder(p)
    validate.check_regular(p, "model file")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head[:4] == GGUF_MAGIC:
        return _load_gguf(p)
    if p.suffix == ".safetensors":
        raise ModelFormatError(f"{p}: a bare safetensors file has no config or tokenizer; "
                               "pass the folder that holds it with config.json and tokenizer.json")
    raise ModelFormatError(f"{p}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF') and not a "
                           "model folder; pass a .gguf file or a folder with config.json")


# ---------------------------------------------------------------- GGUF


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # GGUF stores q/k rows interleaved per head for pairwise RoPE; undo it to rotate-half order.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: Path):
    from .gguf_file import GGUFFile

    try:
        g = GGUFFile(path)
        validate.check_gguf(g.fields, [t.name for t in g.tensors], path)
        _check_gguf_shapes(g, path)
        return g
    except ModelFormatError:
        raise
    except (ValueError, OSError, struct.error) as e:
        raise ModelFormatError(f"{path}: GGUF file is truncated or corrupt ({e}); download it "
                               "again (`edge-readme pull NAME`) or re-export it") from None


def _check_gguf_shapes(g, path: Path) -> None:
    """Tensor infos against the metadata's shapes, before any tensor is dequantized."""
    import dataclasses

    from .config import SUPPORTED_ARCHITECTURES

    if g.fields.get("general.architecture") not in SUPPORTED_ARCHITECTURES:
        return  # from_gguf_fields names the architectures it runs
    config = ModelConfig.from_gguf_fields(g.fields, str(path))
    want = expected_shapes(dataclasses.replace(config, tie_embeddings=False))
    for t in g.tensors:
        name = _gguf_to_hf(t.name)
        if name in want and tuple(reversed(t.shape)) != want[name]:
            raise ModelFormatError(
                f"{path}: tensor {t.name}: expected shape {list(reversed(want[name]))} from the "
                f"metadata, found {list(t.shape)}; the file does not match its own metadata. "
                "Re-export the model.")


def _load_gguf(path: Path) -> LoadedModel:
    import dataclasses

    g = _open_gguf(path)
    config = ModelConfig.from_gguf_fields(g.fields, str(path))
    infos = {name: t for t in g.tensors if (name := _gguf_to_hf(t.name)) is not None}
    # (rope_freqs and other tensors we derive ourselves have no name here)

    def rows(t, start: int | None, stop: int | None) -> np.ndarray:
        try:
            return g.dequantize(t, start, stop)
        except NotImplementedError:
            raise ModelFormatError(
                f"{path}: tensor {t.name} has type {t.type_name}, which the gguf package "
                "cannot dequantize; re-export the model with a common type (F16, Q8_0, Q4_K...)"
            ) from None
        except (ValueError, IndexError) as e:
            raise ModelFormatError(f"{path}: tensor {t.name} is truncated or corrupt ({e}); "
                                   "download or export the file again") from None

    def fetch(name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        permuted = config.architecture == "llama" and name.endswith(("q_proj.weight",
                                                                      "k_proj.weight"))
        if permuted and start is not None:
            raise ValueError(f"{name}: its rows are permuted per head; read it whole")
        arr = rows(infos[name], start, stop)
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=not arr.flags.writeable))
        if permuted:  # qwen2 GGUFs keep Hugging Face row order (llama.cpp rotates NEOX-style)
            w = _unpermute(w, config.num_heads if name.endswith("q_proj.weight")
                           else config.num_kv_heads)
        return w

    for t in infos.values():  # every type dequantizes (one row each) before the build
        rows(t, 0, 1)
    lookups = {n: RowFile(path, t.offset, t.nbytes // t.shape[1], (t.shape[1], t.shape[0]),
                          f"gguf:{t.qtype}")
               for n, t in infos.items() if n.endswith("embed_tokens.weight")
               and len(t.shape) == 2}
    tensors = LazyTensors({n: tuple(reversed(t.shape)) for n, t in infos.items()}, fetch,
                          lookups)
    config = dataclasses.replace(config, tie_embeddings="lm_head.weight" not in tensors)
    _check_tensors(config, tensors, str(path))
    spec = _gguf_tokenizer(g.fields, path)
    return LoadedModel(config, tensors, spec, g.fields.get("tokenizer.chat_template"), path)


def _gguf_to_hf(name: str) -> str | None:
    for pat, hf in _GGUF_PATTERNS:
        m = pat.match(name)
        if m:
            return hf.format(i=m.group(1)) if m.groups() else hf
    return None


def _gguf_tokenizer(fields: dict[str, Any], path: Path) -> TokenizerSpec:
    tokens = fields.get("tokenizer.ggml.tokens")
    model = fields.get("tokenizer.ggml.model")
    if not tokens or model is None:
        raise ModelFormatError(f"{path}: GGUF has no tokenizer "
                               "(tokenizer.ggml.tokens/model missing)")
    if model not in ("gpt2", "llama"):
        raise ModelFormatError(f"{path}: tokenizer.ggml.model is {model!r}; supported are 'gpt2' "
                               "(byte-level BPE) and 'llama' (SentencePiece-style)")
    return TokenizerSpec(
        kind="gguf",
        model=model,
        pre=fields.get("tokenizer.ggml.pre") or "",
        tokens=list(tokens),
        scores=fields.get("tokenizer.ggml.scores"),
        token_types=fields.get("tokenizer.ggml.token_type"),
        merges=fields.get("tokenizer.ggml.merges"),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama")),
        add_space_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", model == "llama")),
    )


# ---------------------------------------------------------------- Hugging Face folders


def _read_json(path: Path) -> Any:
    if not path.exists() and not path.is_symlink():
        raise ModelFormatError(f"{path}: missing; a model folder needs config.json, "
                               "model.safetensors (or shards + index) and tokenizer.json")
    return validate.read_json(path, validate.JSON_LIMIT, path.name, kind=None)


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: expected a 'weight_map' object")
        names = [validate.inside(folder, f, index, f"weight_map[{k!r}]")
                 for k, f in weight_map.items()]
        return sorted(set(names))
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise ModelFormatError(f"{folder}: no model.safetensors or model.safetensors.index.json; "
                           "a model folder needs its weights in safetensors "
                           "(pickles are never loaded)")


def _safe_open(path: Path):
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise ModelFormatError(f"{path}: missing shard named by the model's index")
    validate.check_regular(path, "safetensors file")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ModelFormatError(f"{path}: not a valid safetensors file or truncated ({e}); "
                               "download or export it again") from None


def _folder_tensors(folder: Path) -> LazyTensors:
    """The folder's tensors, lazily: floats come out as float32, and each 4-bit matrix
    (`NAME.q4` + `NAME.q4_scale` + `NAME.q4_min`) as the float32 `NAME` it encodes."""
    from safetensors import SafetensorError

    from .quant.q4 import decode_plain

    where: dict[str, tuple[Any, Path]] = {}
    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    lookups: dict[str, RowFile] = {}
    for path in safetensors_files(folder):
        f = _safe_open(path)
        lookups.update((n, r) for n, r in safetensors_rows(path).items()
                       if n.endswith("embed_tokens.weight") or n == "router.embed")
        for name in f.keys():
            sl = f.get_slice(name)
            where[name] = (f, path)
            meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
    shapes = {n: sh for n, (sh, _) in meta.items()}
    for name in [n for n in meta if n.endswith(".q4")]:
        base = name[:-3]
        (q, qd), scale, lo = meta[name], meta.get(base + ".q4_scale"), meta.get(base + ".q4_min")
        if scale is None or lo is None or qd != "U8" or len(q) != 2 \
                or scale[1] not in ("F16", "BF16", "F32") or scale != lo \
                or scale[0] != (q[0], q[1] * 2 // 32):
            raise ModelFormatError(f"{folder}: 4-bit tensor {base}: expected uint8 {base}.q4 "
                                   f"[N, K/2] with float {base}.q4_scale and {base}.q4_min "
                                   "[N, K/32]; the model folder is corrupt: rebuild it")
        for n in (name, base + ".q4_scale", base + ".q4_min"):
            del shapes[n]
        shapes[base] = (q[0], q[1] * 2)

    def get(name: str, start: int | None, stop: int | None) -> torch.Tensor:
        f, path = where[name]
        try:
            return f.get_tensor(name) if start is None else f.get_slice(name)[start:stop]
        except SafetensorError as e:
            raise ModelFormatError(f"{path}: tensor {name} is truncated or corrupt ({e}); "
                                   "rebuild or download the model again") from None

    def fetch(name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        if name not in where:  # a 4-bit matrix
            return decode_plain(*(get(name + x, start, stop)
                                  for x in (".q4", ".q4_scale", ".q4_min")))
        t = get(name, start, stop)
        return t.float() if t.is_floating_point() else t

    return LazyTensors(shapes, fetch, lookups)


def _load_hf_folder(folder: Path) -> LoadedModel:
    cfg_path = folder / "config.json"
    config = ModelConfig.from_hf_dict(_read_json(cfg_path), str(cfg_path))
    tensors = _folder_tensors(folder)
    if "lm_head.weight" not in tensors and not config.tie_embeddings:
        import dataclasses

        config = dataclasses.replace(config, tie_embeddings=True)
    _check_tensors(config, tensors, str(folder))
    tok_json = folder / "tokenizer.json"
    if not tok_json.exists():
        raise ModelFormatError(f"{tok_json}: missing; copy the model's tokenizer.json "
                               "into the folder")
    if validate.check_regular(tok_json, "tokenizer.json") > validate.TOKENIZER_JSON_LIMIT:
        raise ModelFormatError(f"{tok_json}: larger than {validate.TOKENIZER_JSON_LIMIT} bytes; "
                               "expected the model's tokenizer.json")
    template = None
    tcfg = folder / "tokenizer_config.json"
    special: dict[str, Any] = {}
    if tcfg.exists():
        special = _read_json(tcfg)
        if not isinstance(special, dict):
            raise ModelFormatError(f"{tcfg}: expected a JSON object, found "
                                   f"{type(special).__name__}; restore the file")
        template = special.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = validate.read_text(folder / "chat_template.jinja", validate.TEMPLATE_LIMIT,
                                      "chat template")
    spec = TokenizerSpec(kind="hf", tokenizer_json=str(tok_json),
                         bos_token_id=config.bos_token_id,
                         eos_token_id=config.eos_token_ids[0] if config.eos_token_ids else None,
                         add_bos=bool(special.get("add_bos_token", False)))
    template = template if isinstance(template, str) else None
    return LoadedModel(config, tensors, spec, template, folder)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (c.q_dim, c.hidden_size),
            p + "self_attn.k_proj.weight": (c.kv_dim, c.hidden_size),
            p + "self_attn.v_proj.weight": (c.kv_dim, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, c.q_dim),
        })
        if c.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (c.q_dim,),
                           p + "self_attn.k_proj.bias": (c.kv_dim,),
                           p + "self_attn.v_proj.bias": (c.kv_dim,)})
        if c.moe is None:
            shapes.update({
                p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            })
    return shapes


def _check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    validate.check_layer_names(config.num_layers, tensors, source)
    validate.check_finite_norms(tensors, source)
    want = expected_shapes(config)
    missing = [k for k in want if k not in tensors]
    wrong = [f"{k}: expected {want[k]}, found {shape_of(tensors, k)}"
             for k in want if k in tensors and shape_of(tensors, k) != want[k]]
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if wrong:
            parts.append("wrong shapes " + "; ".join(wrong[:5]))
        raise ModelFormatError(f"{source}: " + ", ".join(parts) +
                               "; the file does not match its own config. Re-export the model.")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Only the config (no weights): from config.json, or from GGUF metadata."""
    import dataclasses

    p = Path(path)
    if p.is_dir():
        return ModelConfig.from_hf_dict(_read_json(p / "config.json"), str(p / "config.json"))
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or folder")
    g = _open_gguf(p)
    config = ModelConfig.from_gguf_fields(g.fields, str(p))
    tied = not any(t.name == "output.weight" for t in g.tensors)
    return dataclasses.replace(config, tie_embeddings=tied)
