"""A tiny random dense Llama model folder for fast offline tests (config, weights, tokenizer).

The tokenizer is a byte-level BPE with the 256 byte symbols and no merges, plus the ChatML
specials, so any text encodes and the ids are easy to reason about. Weights are seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_readme.config import ModelConfig

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(vocab_size: int = 259) -> ModelConfig:
    im_end = 256 + SPECIALS.index("<|im_end|>")
    return ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       max_position=4096, tie_embeddings=True, bos_token_id=None,
                       eos_token_ids=(im_end,), name="tiny-dense")


def _tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok.to_str()


def _weights(c: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).contiguous()

    d = c.hidden_size
    w = {"model.embed_tokens.weight": rand(c.vocab_size, d, scale=1.0),
         "model.norm.weight": torch.ones(d)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": torch.ones(d),
            p + "post_attention_layernorm.weight": torch.ones(d),
            p + "self_attn.q_proj.weight": rand(c.q_dim, d),
            p + "self_attn.k_proj.weight": rand(c.kv_dim, d),
            p + "self_attn.v_proj.weight": rand(c.kv_dim, d),
            p + "self_attn.o_proj.weight": rand(d, c.q_dim),
            p + "mlp.gate_proj.weight": rand(c.intermediate_size, d),
            p + "mlp.up_proj.weight": rand(c.intermediate_size, d),
            p + "mlp.down_proj.weight": rand(d, c.intermediate_size),
        })
    return w


def write_tiny_dense(folder: str | Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = tiny_config()
    (folder / "config.json").write_text(json.dumps(c.to_hf_dict(), indent=1), encoding="utf-8")
    save_file(_weights(c, seed), str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    tcfg = {"chat_template": CHATML, "eos_token": "<|im_end|>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg), encoding="utf-8")
    return folder
