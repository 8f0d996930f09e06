"""Tokenizers from GGUF metadata or tokenizer.json (through the `tokenizers` library), chat
templates
rendered in jinja2's sandbox, and incremental detokenization for streaming."""

from __future__ import annotations

from typing import Any, Sequence

from .errors import ModelFormatError, RequestError
from .loader import TokenizerSpec

_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, spec: TokenizerSpec, chat_template: str | None = None):
        from .memory import trim_heap

        self.spec = spec
        self._tok = _build(spec)
        trim_heap()  # parsing a 150k-entry vocabulary frees ~40 MiB that glibc would keep
        self.chat_template = chat_template
        self.bos_token_id = spec.bos_token_id
        self.eos_token_id = spec.eos_token_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # a lone surrogate ("\ud800") is not text the tokenizer takes
            raise RequestError("prompt: not valid Unicode text (it holds a lone surrogate such "
                               "as \\ud800); send UTF-8 text") from None
        if (self.spec.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise RequestError("this model has no chat template; use raw completion "
                               "(drop --chat) or a model whose metadata carries one")
        _check_messages(messages)
        from .template_sandbox import compile_template, render

        bos = self.decode([self.bos_token_id]) if self.bos_token_id is not None else ""
        eos = self.decode([self.eos_token_id]) if self.eos_token_id is not None else ""
        if self._template is None:  # bounded in time, output and sizes; every failure a 400
            self._template = compile_template(self.chat_template, _template_error)
        return render(self._template, messages=messages, bos_token=bos, eos_token=eos,
                      add_generation_prompt=add_generation_prompt)


def _template_error(msg: str) -> None:
    raise RequestError(f"chat template refused the messages: {msg}")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: expected a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}]: expected an object with string 'role' "
                               "and 'content'")


class StreamDecoder:
    """Turns token ids into text pieces as they come, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tok = tokenizer
        self.skip = skip_special
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special=self.skip)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted:]
        self.emitted = len(text)
        if len(self.ids) > 64:  # keep the window short: re-anchor on the last few tokens
            tail = self.ids[-8:]
            self.ids, self.emitted = tail, len(self.tok.decode(tail, skip_special=self.skip))
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special=self.skip)
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece


# ---------------------------------------------------------------- building


def _build(spec: TokenizerSpec):
    from tokenizers import Tokenizer as HFTokenizer

    if spec.kind == "hf":
        try:
            return HFTokenizer.from_file(spec.tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ModelFormatError(f"{spec.tokenizer_json}: not a valid tokenizer.json "
                                   f"({e})") from None
    try:
        return _byte_level_bpe(spec) if spec.model == "gpt2" else _sentencepiece_bpe(spec)
    except Exception as e:  # tokenizers raises bare Exceptions on inconsistent vocabularies
        raise ModelFormatError(f"GGUF tokenizer ({spec.model}): the vocabulary or merges are "
                               f"inconsistent ({e}); re-export the model") from None


def _special_tokens(spec: TokenizerSpec):
    from tokenizers import AddedToken

    types = spec.token_types or []
    return [AddedToken(spec.tokens[i], special=True, normalized=False)
            for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]


def _byte_level_bpe(spec: TokenizerSpec):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {t: i for i, t in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in (spec.merges or [])]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    gpt2 = Regex(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    split = pre_tokenizers.Split(gpt2, behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    steps = [split, byte_level]
    if spec.pre in ("smollm", "starcoder", "refact", "deepseek-llm"):
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif spec.pre in ("llama3", "llama-bpe", "qwen2"):
        digits = r"\p{N}" if spec.pre == "qwen2" else r"\p{N}{1,3}"  # qwen2: one digit a piece
        llama3 = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits +
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        steps = [pre_tokenizers.Split(llama3, behavior="isolated"), byte_level]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_special_tokens(spec))
    return tok


def _sentencepiece_bpe(spec: TokenizerSpec):
    # SentencePiece BPE vocabularies in GGUF carry scores, not merges: rebuild them by score.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(spec.tokens)}
    scores = spec.scores or [0.0] * len(spec.tokens)
    merges = []
    for tok_str, idx in vocab.items():
        if len(tok_str) < 2:
            continue
        for cut in range(1, len(tok_str)):
            left, right = tok_str[:cut], tok_str[cut:]
            if left in vocab and right in vocab:
                merges.append((scores[idx], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = spec.tokens[0] if spec.tokens else None
    model = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                       unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = HFTokenizer(model)
    norms = [normalizers.Replace(" ", "\u2581")]
    if spec.add_space_prefix:
        norms.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(norms)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(_special_tokens(spec))
    return tok
