"""The one frozen model config, built from GGUF metadata or a Hugging Face `config.json`.

Unknown keys are ignored; variants are made with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ModelFormatError
from .validate import check_config, check_hf_config

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Qwen2 is Llama plus q/k/v biases; HF class names per architecture (for config.json round trips).
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class RouterConfig:
    """The pre-gating router: a tiny causal transformer over token ids (Read-ME's "cluster
    predictor")."""

    dim: int = 64
    num_layers: int = 1
    num_heads: int = 4
    ffn_dim: int = 256
    max_position: int = 8192
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RouterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class MoEConfig:
    """Read-ME MoE fields: a shared always-on expert plus `num_experts` routed ones per layer."""

    num_experts: int
    routing: str = "global"  # "global": one expert index for every layer; "per_layer": a path
    shared_sizes: tuple[int, ...] = ()  # neurons in each layer's shared expert
    expert_file: str = "experts.safetensors"
    manifest_file: str = "experts.json"
    router: RouterConfig = RouterConfig()
    domains: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "router" in kw:
            kw["router"] = RouterConfig.from_dict(kw["router"])
        for key in ("shared_sizes", "domains"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if kw.get("routing", "global") not in ("global", "per_layer"):
            raise ModelFormatError(
                f"config.json: moe.routing is {kw['routing']!r}; expected 'global' or 'per_layer'"
            )
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shared_sizes"] = list(self.shared_sizes)
        d["domains"] = list(self.domains)
        return d


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 2048
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    moe: MoEConfig | None = None
    architecture: str = "llama"
    attention_bias: bool = False  # q/k/v projections carry a bias (qwen2)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}); the model file is inconsistent"
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, Mapping):
            check_hf_config(d, source)  # raises: names what was found
        arch = str(d.get("model_type", "llama"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"{source}: model_type is {arch!r}; edge-readme runs "
                f"{SUPPORTED_ARCHITECTURES} models. "
                "Use a Llama- or Qwen2-architecture model."
            )
        check_hf_config(d, source)
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return check_config(cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads", heads)),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                rms_eps=float(d.get("rms_norm_eps", 1e-5)),
                max_position=int(d.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                name=str(d.get("_name_or_path", "")),
                moe=MoEConfig.from_dict(d["moe"]) if d.get("moe") else None,
                architecture=arch,
                attention_bias=bool(d.get("attention_bias", arch == "qwen2")),
            ), source)
        except KeyError as e:
            raise ModelFormatError(f"{source}: missing field {e.args[0]!r}; "
                                   "expected a Hugging Face Llama config.json") from None
        except (TypeError, ValueError) as e:
            raise ModelFormatError(f"{source}: a field has the wrong type ({e})") from None

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model_type": self.architecture,
            "architectures": [HF_CLASSES[self.architecture]],
            "attention_bias": self.attention_bias,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "_name_or_path": self.name,
        }
        if self.moe is not None:
            d["moe"] = self.moe.to_dict()
        return d

    @classmethod
    def from_gguf_fields(cls, f: Mapping[str, Any], source: str) -> "ModelConfig":
        arch = f.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"{source}: general.architecture is {arch!r}; edge-readme runs "
                f"{SUPPORTED_ARCHITECTURES} models. Use a Llama- or Qwen2-architecture GGUF."
            )

        def get(key: str, default: Any = None) -> Any:
            v = f.get(f"{arch}.{key}", default)
            if v is None:
                raise ModelFormatError(f"{source}: GGUF metadata key {arch}.{key} is missing")
            return v

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        rot = f.get(f"{arch}.rope.dimension_count")
        head_dim = int(f.get(f"{arch}.attention.key_length", rot or hidden // heads))
        n_vocab = f.get(f"{arch}.vocab_size") or len(f.get("tokenizer.ggml.tokens", ()))
        eos = f.get("tokenizer.ggml.eos_token_id")
        eot = f.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
        return check_config(cls(
            vocab_size=int(n_vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(f.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rope_theta=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(f.get(f"{arch}.context_length", 2048)),
            tie_embeddings=False,  # the loader decides from the tensors present
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
            name=str(f.get("general.name", "")),
            architecture=arch,
            attention_bias=arch == "qwen2",
        ), source)
