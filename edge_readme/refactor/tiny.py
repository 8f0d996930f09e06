"""A tiny random dense Llama as a Hugging Face folder, for tests and quick trials of the
refactoring: config.json, model.safetensors and a byte-level BPE tokenizer.json trained on
the given text."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def train_tokenizer(texts: list[str], vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def write_tiny_llama(folder: Path, texts: list[str], hidden: int = 32, ffn: int = 64,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts)
    tok.save(str(folder / "tokenizer.json"))
    vocab, hd = tok.get_vocab_size(), hidden // heads
    config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hd,
              "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "eos_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen),
         "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + 0.1 * torch.randn(hidden, generator=gen),
                  p + "post_attention_layernorm.weight": torch.ones(hidden),
                  p + "self_attn.q_proj.weight": rnd(heads * hd, hidden),
                  p + "self_attn.k_proj.weight": rnd(kv_heads * hd, hidden),
                  p + "self_attn.v_proj.weight": rnd(kv_heads * hd, hidden),
                  p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
                  p + "mlp.gate_proj.weight": rnd(ffn, hidden),
                  p + "mlp.up_proj.weight": rnd(ffn, hidden),
                  p + "mlp.down_proj.weight": rnd(hidden, ffn)})
    save_file(t, str(folder / "model.safetensors"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return folder
