"""Anti-repetition sampling: the rules, their validation, greedy exactness, and the engine."""

import pytest
import torch

from edge_readme.errors import RequestError
from edge_readme.sampling import Sampler, SamplingParams, penalise


def test_off_by_default_and_greedy_unchanged():
    p = SamplingParams()
    assert not p.penalised
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert penalise(logits, [1, 1, 3], p) is logits
    s = Sampler(p)
    assert [s(logits) for _ in range(3)] == [1, 1, 1]  # plain greedy repeats


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    p = SamplingParams(repetition_penalty=2.0)
    x = penalise(torch.tensor([4.0, -1.0, 1.0]), [0, 1], p)
    assert x.tolist() == [2.0, -2.0, 1.0]


def test_frequency_and_presence_penalties_follow_openai():
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    x = penalise(torch.zeros(3), [2, 2, 2, 0], p)
    assert x.tolist() == [-1.5, 0.0, -2.5]


def test_no_repeat_ngram_bans_the_token_that_would_repeat_an_ngram():
    p = SamplingParams(no_repeat_ngram=2)
    x = penalise(torch.zeros(5), [1, 2, 3, 1], p)  # "1 2" seen: after 1, 2 is banned
    assert x[2] == float("-inf") and torch.isfinite(x[[0, 1, 3, 4]]).all()
    s = Sampler(SamplingParams(no_repeat_ngram=3))
    logits = torch.tensor([0.0, 2.0, 1.0, 0.5])
    out = [s(logits) for _ in range(12)]
    grams = [tuple(out[i:i + 3]) for i in range(len(out) - 2)]
    assert len(grams) == len(set(grams))


def test_penalised_greedy_is_deterministic():
    p = SamplingParams(repetition_penalty=1.3, no_repeat_ngram=2)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(50, generator=g) for _ in range(30)]
    a, b = Sampler(p), Sampler(p)
    assert [a(x) for x in steps] == [b(x) for x in steps]


@pytest.mark.parametrize("kw, name", [
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"),
    (dict(presence_penalty="1"), "presence_penalty"),
    (dict(no_repeat_ngram=-1), "no_repeat_ngram"),
    (dict(no_repeat_ngram=True), "no_repeat_ngram"),
])
def test_bad_values_are_named(kw, name):
    with pytest.raises(RequestError, match=name):
        SamplingParams(**kw)


def test_engine_applies_the_penalties(tmp_path):
    from edge_readme import Engine
    from tests.tiny_dense import write_tiny_dense

    with Engine.load(str(write_tiny_dense(tmp_path / "tiny")), device="cpu",
                     context_length=256) as e:
        plain = e.generate("Hello world", max_tokens=40, ignore_eos=True).token_ids
        again = e.generate("Hello world", max_tokens=40, ignore_eos=True).token_ids
        fixed = e.generate("Hello world", max_tokens=40, ignore_eos=True,
                           no_repeat_ngram=2).token_ids
        with pytest.raises(RequestError, match="repetition_penalty"):
            e.generate("Hello", repetition_penalty=-1)
    assert plain == again
    grams = [tuple(fixed[i:i + 2]) for i in range(len(fixed) - 1)]
    assert len(grams) == len(set(grams))
    plain_grams = [tuple(plain[i:i + 2]) for i in range(len(plain) - 1)]
    if len(plain_grams) != len(set(plain_grams)):  # the random tiny model loops: it changed
        assert fixed != plain


def test_chat_defaults_apply_only_when_sampling_and_unset():
    from edge_readme.sampling import CHAT_PENALTIES, PENALTIES_OFF, chat_penalties

    assert chat_penalties(0.0) == PENALTIES_OFF  # greedy stays plain greedy
    assert chat_penalties(0.7) == CHAT_PENALTIES
    got = chat_penalties(0.0, no_repeat_ngram=3, repetition_penalty=None)
    assert got == {**PENALTIES_OFF, "no_repeat_ngram": 3}
    got = chat_penalties(0.7, repetition_penalty=1.2)
    assert got == {**CHAT_PENALTIES, "repetition_penalty": 1.2}
    with pytest.raises(TypeError, match="dry"):
        chat_penalties(0.7, dry=1)


@pytest.mark.parametrize("body, param", [
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": "high"}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
])
def test_server_refuses_bad_penalties(body, param):
    from edge_readme.server import protocol as P

    with pytest.raises(P.APIError) as e:
        P.sampling(body, P.Limits())
    assert e.value.status == 400 and param in str(e.value.message)


def test_server_fields_reach_the_engine_keywords():
    from edge_readme.sampling import CHAT_PENALTIES
    from edge_readme.server import protocol as P

    kw = P.sampling({"temperature": 0, "frequency_penalty": 0.5, "no_repeat_ngram_size": 3},
                    P.Limits())
    assert kw["frequency_penalty"] == 0.5 and kw["no_repeat_ngram"] == 3
    assert kw["repetition_penalty"] == 1.0
    kw = P.sampling({}, P.Limits())  # OpenAI's default temperature 1: the chat defaults
    assert {k: kw[k] for k in CHAT_PENALTIES} == CHAT_PENALTIES
    SamplingParams(**{k: kw[k] for k in ("temperature", "top_p", "top_k", "seed",
                                          *CHAT_PENALTIES)})


def test_cli_generate_takes_the_penalty_flags(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from edge_readme.cli.main import cli
    from tests.tiny_dense import write_tiny_dense

    monkeypatch.setenv("EDGE_README_HOME", str(tmp_path / "home"))
    folder = str(write_tiny_dense(tmp_path / "tiny"))
    base = ["generate", "Hello world", "-m", folder, "--max-tokens", "30", "--json"]
    r = CliRunner().invoke(cli, base + ["--no-repeat-ngram", "2", "--repetition-penalty", "1.2"])
    assert r.exit_code == 0, r.output
    ids = json.loads(r.output[r.output.index("{"):])["token_ids"]
    grams = [tuple(ids[i:i + 2]) for i in range(len(ids) - 1)]
    assert len(grams) == len(set(grams))
    r = CliRunner().invoke(cli, base + ["--repetition-penalty", "0"])
    assert r.exit_code == 2 and "repetition-penalty" in r.output
