"""Our dense forward against llama.cpp (llama-cpp-python) on the same GGUF: token ids, greedy
tokens and next-token top-1 agreement.

llama.cpp rounds every activation to 8 bits before its quantized dot products and keeps an fp16 KV
cache, so its logits carry noise of its own: with only its KV cache switched to f32 it agrees with
itself on 94-97% of top-1 positions. The thresholds below are what our exact float32 forward
measures against that noisy reference (README, "Correctness against llama.cpp")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.peer, pytest.mark.real]

N_GREEDY = 12
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea,",
    "import numpy as np\n\ndef normalize(v):\n",
    "The three primary colors are",
    "Q: What is 12 times 7?\nA:",
    "<|im_start|>user\nName a planet in our solar system.<|im_end|>\n<|im_start|>assistant\n",
    "SELECT name, COUNT(*) FROM orders GROUP BY",
    "The largest ocean on Earth is",
    "In 1969, Neil Armstrong",
    "for i in range(10):\n    print(",
    "Shall I compare thee",
]
TOKENIZER_TEXTS = ["The capital of France is", "def f(x):\n    return x**2 + 12345",
                   "<|im_start|>user\nhi<|im_end|>", "  multiple   spaces\n\n\ttab",
                   "héllo wörld 日本語 🙂", "3.14159 and 1,000,000", "<|endoftext|>x<file_sep>"]
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Before that, books were copied by hand, mostly in monasteries, and a single Bible could take "
    "a scribe years to finish. The new presses spread quickly through Europe: by 1500 more than "
    "a thousand print shops had produced millions of volumes. Prices fell, literacy rose, and "
    "ideas travelled faster than ever before. Scholars could compare identical copies of a text, "
    "which made errors easier to find and knowledge easier to build upon.\n\n"
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n"
    "    middle = len(items) // 2\n    left = merge_sort(items[:middle])\n"
    "    right = merge_sort(items[middle:])\n    merged = []\n    i = j = 0\n"
    "    while i < len(left) and j < len(right):\n        if left[i] <= right[j]:\n"
    "            merged.append(left[i])\n            i += 1\n        else:\n"
    "            merged.append(right[j])\n            j += 1\n"
    "    return merged + left[i:] + right[j:]\n\n"
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light "
    "into chemical energy. In the chloroplasts, chlorophyll absorbs mostly blue and red light; "
    "water is split, oxygen is released, and the energy is stored in molecules of ATP and NADPH. "
    "These then drive the Calvin cycle, which fixes carbon dioxide from the air into sugars. "
    "Nearly all life on Earth depends on this process, directly or through the food chain, and "
    "the oxygen in the atmosphere is its by-product. Tropical forests and ocean plankton are the "
    "largest contributors. Scientists study it to design better crops and artificial leaves that "
    "could one day produce fuel from sunlight. The recipe for a simple bread needs flour, water, "
    "salt and yeast: mix, knead for ten minutes, let it rise for an hour, shape it, let it rise "
    "again and bake at 220 degrees for about thirty minutes until the crust is brown.\n\n"
    "Dear Ms. Alvarez, thank you for your letter of 3 March. We have reviewed the invoice you "
    "mentioned (number 4471-B) and found that the shipping charge was applied twice. A refund of "
    "$18.50 will reach your account within five working days. We apologise for the trouble and "
    "hope to serve you again soon. Kind regards, the customer service team."
)


@pytest.fixture(scope="module")
def gguf_path():
    from edge_readme import registry

    return registry.pull("smollm2-135m")


@pytest.fixture(scope="module")
def peer(gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(gguf_path), n_ctx=1024, n_batch=512, n_threads=2,
                           logits_all=True, verbose=False)


@pytest.fixture(scope="module")
def engine(gguf_path, peer):
    from edge_readme import Engine

    # float32: exactly the GGUF's dequantized values, the comparison these bounds were set for
    # (q4's bfloat16 kernel inputs and int8 head round once more; README "Weight formats")
    with Engine.load(str(gguf_path), device="cpu", context_length=1024, weights="f32") as e:
        yield e


def _peer_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def test_token_ids_equal_llamacpp(peer, engine):
    for text in TOKENIZER_TEXTS:
        want = peer.tokenize(text.encode(), add_bos=False, special=True)
        assert engine.tokenizer.encode(text) == want, text


def test_greedy_tokens_track_llamacpp(peer, engine):
    """Most prompts give llama.cpp's first 12 tokens exactly; all share a first stretch."""
    same_prefix = []
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        want = _peer_greedy(peer, ids, N_GREEDY)
        got = engine.generate(ids, max_tokens=N_GREEDY).token_ids
        same_prefix.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                                min(len(got), len(want))))
    full = sum(k >= min(N_GREEDY, 8) for k in same_prefix)
    assert full >= len(PROMPTS) - 4, f"tokens equal to llama.cpp per prompt: {same_prefix}"
    assert engine.generate("The capital of France is", max_tokens=2).text == " Paris."


def test_top1_agreement_512_tokens(peer, engine):
    from edge_readme.model import KVCache

    rt = engine.runtime
    ids = engine.tokenizer.encode(TEXT)[:512]
    assert len(ids) == 512
    peer.reset()
    peer.eval(ids)
    want = torch.from_numpy(np.asarray(peer.scores[:512])).argmax(-1)
    with torch.inference_mode():
        got = rt.model(torch.tensor(ids), KVCache(rt.config, 512), 0, all_logits=True).argmax(-1)
    agree = (got == want).float().mean().item()
    assert agree >= 0.95, f"top-1 agreement with llama.cpp {agree:.4f} < 0.95"
