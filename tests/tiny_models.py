"""Tiny random Llama models written to disk for tests: GGUF, Hugging Face folder, Read-ME MoE.

Everything is built from a seed; nothing is fetched. The tokenizer is a real byte-level BPE over a
small vocabulary, written both as GGUF metadata and as tokenizer.json.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from edge_readme.config import ModelConfig, MoEConfig, RouterConfig
from edge_readme.experts_format import write_experts
from edge_readme.loader import TokenizerSpec

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_chars() -> list[str]:
    # GPT-2's printable stand-ins for the 256 byte values
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 3 specials, 256 bytes, a few merges."""
    bc = _byte_chars()
    sp = bc[ord(" ")]
    merges = [f"{sp} t", "h e", f"{sp}t he", "i n", f"{sp} a", "e r", "o n", "r e"]
    tokens = SPECIALS + bc + [m.replace(" ", "") for m in merges]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def tiny_spec() -> TokenizerSpec:
    tokens, types, merges = tiny_vocab()
    return TokenizerSpec(kind="gguf", model="gpt2", pre="default", tokens=tokens,
                         token_types=types, merges=merges, bos_token_id=0, eos_token_id=2)


def tiny_config(layers: int = 3, moe: MoEConfig | None = None, **kw) -> ModelConfig:
    vocab = len(tiny_vocab()[0])
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=layers,
                num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_eps=1e-5,
                max_position=256, tie_embeddings=True, bos_token_id=0, eos_token_ids=(2,),
                name="tiny", moe=moe)
    base.update(kw)
    return ModelConfig(**base)


def tiny_tensors(c: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).float()

    t = {"model.embed_tokens.weight": w(c.vocab_size, c.hidden_size, scale=0.5),
         "model.norm.weight": 1 + w(c.hidden_size, scale=0.05)}
    if not c.tie_embeddings:
        t["lm_head.weight"] = w(c.vocab_size, c.hidden_size, scale=0.3)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + w(c.hidden_size, scale=0.05)
        t[p + "post_attention_layernorm.weight"] = 1 + w(c.hidden_size, scale=0.05)
        t[p + "self_attn.q_proj.weight"] = w(c.q_dim, c.hidden_size, scale=0.25)
        t[p + "self_attn.k_proj.weight"] = w(c.kv_dim, c.hidden_size, scale=0.25)
        t[p + "self_attn.v_proj.weight"] = w(c.kv_dim, c.hidden_size)
        t[p + "self_attn.o_proj.weight"] = w(c.hidden_size, c.q_dim)
        t[p + "mlp.gate_proj.weight"] = w(c.intermediate_size, c.hidden_size, scale=0.2)
        t[p + "mlp.up_proj.weight"] = w(c.intermediate_size, c.hidden_size, scale=0.2)
        t[p + "mlp.down_proj.weight"] = w(c.hidden_size, c.intermediate_size, scale=0.2)
    return t


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # Hugging Face rotate-half rows -> GGUF's interleaved-pair rows (what convert_hf_to_gguf does)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


GGUF_OF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path: Path, c: ModelConfig, tensors: dict[str, torch.Tensor],
               qtype: str = "F32", arch: str = "llama", chat_template: str | None = CHATML) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for name, t in tensors.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{GGUF_OF[rest]}"
        else:
            gname = GGUF_OF[name]
        if arch != "llama":
            pass  # qwen2 GGUFs keep Hugging Face row order
        elif name.endswith("q_proj.weight"):
            t = _permute(t, c.num_heads)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, c.num_kv_heads)
        arr = t.numpy().astype(np.float32)
        q = gguf.GGMLQuantizationType[qtype] if arr.ndim == 2 else gguf.GGMLQuantizationType.F32
        if q in (gguf.GGMLQuantizationType.F32,):
            w.add_tensor(gname, arr)
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tokenizer_files(folder: Path, chat_template: str | None = CHATML) -> None:
    from edge_readme.tokenizer import Tokenizer

    Tokenizer(tiny_spec())._tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def write_hf(folder: Path, c: ModelConfig, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    write_tokenizer_files(folder)
    return folder


def write_moe(folder: Path, num_experts: int = 4, layers: int = 3, seed: int = 0,
              routing: str = "global", dtype: torch.dtype = torch.float32,
              shared_rows: int = 32) -> Path:
    """A tiny Read-ME MoE: each layer's FFN neurons split into shared + num_experts routed parts."""
    from edge_readme.router import Router

    c = tiny_config(layers=layers)
    t = tiny_tensors(c, seed)
    rcfg = RouterConfig(dim=16, num_layers=1, num_heads=2, ffn_dim=32, max_position=256)
    g = torch.Generator().manual_seed(seed + 1)
    experts, dense = {}, {}
    per = (c.intermediate_size - shared_rows) // num_experts
    for i in range(layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (t.pop(p + n + "_proj.weight") for n in ("gate", "up", "down"))
        perm = torch.randperm(c.intermediate_size, generator=g)
        shared = perm[:shared_rows]
        dense[p + "shared.gate_proj.weight"] = gate[shared]
        dense[p + "shared.up_proj.weight"] = up[shared]
        dense[p + "shared.down_proj.weight"] = down[:, shared]
        for e in range(num_experts):
            rows = perm[shared_rows + e * per: shared_rows + (e + 1) * per - (e % 2)]
            experts[(i, e)] = torch.stack([gate[rows], up[rows], down[:, rows].T])  # [3, r, D]
    moe = MoEConfig(num_experts=num_experts, routing=routing,
                    shared_sizes=tuple([shared_rows] * layers), router=rcfg,
                    domains=tuple(f"d{e}" for e in range(num_experts)))
    c = dataclasses.replace(c, moe=moe)
    torch.manual_seed(seed + 2)
    router = Router(rcfg, c.vocab_size, num_experts, layers, routing)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    t.update(dense)
    t.update(router.state_tensors())
    write_hf(folder, c, t)
    write_experts(folder, experts, dtype)
    return folder


def write_moe_in(folder: Path, fmt: str) -> Path:
    """The 4-expert, 3-layer tiny MoE with experts stored as a run of `fmt` reads them: q4
    experts for q4 weights, float32 ones otherwise."""
    return write_moe(folder, num_experts=4, layers=3,
                     dtype="q4" if fmt == "q4" else torch.float32)


REFACTOR_WORDS = {"code": "def return import class self for in if else print lambda".split(),
                  "legal": "shall licence warranty party agreement liability terms hereby".split(),
                  "prose": "the moon river night she walked softly over hills dreaming".split()}


def write_refactor_fixture(root: Path, docs_per_domain: int = 10, seed: int = 0) -> Path:
    """Three labelled toy domains in root/data.jsonl and a tiny dense Llama in root/dense."""
    import random

    from edge_readme.refactor.tiny import write_tiny_llama

    rng = random.Random(seed)
    recs = [{"domain": d, "text": " ".join(rng.choice(ws) for _ in range(120))}
            for d, ws in REFACTOR_WORDS.items() for _ in range(docs_per_domain)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    write_tiny_llama(root / "dense", [r["text"] for r in recs])
    return root
