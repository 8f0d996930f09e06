"""Prompt routing: the TF-IDF classifiers, the Read-ME domain router, the label table and the
route file (checked field by field)."""

from __future__ import annotations

import json

import pytest
import torch

from edge_readme.config import RouterConfig
from edge_readme.router import Router
from edge_readme.routing import (
    DOMAINS,
    PromptRouter,
    RandomClassifier,
    RouteFileError,
    default_table,
    load_corpus,
    read_route_file,
    spec_from,
    train,
)
from edge_readme.routing.readme_domains import ReadmeDomainRouter
from edge_readme.routing.tfidf import KMeansRouter, LinearRouter, TfidfVectorizer

CODER, CHAT = "qwen2.5-coder-0.5b-readme", "smollm2-135m-readme"


def test_corpus_has_every_domain_in_both_splits():
    for split in ("train", "test"):
        rows = load_corpus(split)
        assert {d for _, d in rows} == set(DOMAINS)
    train_texts = {t for t, _ in load_corpus("train")}
    assert not train_texts & {t for t, _ in load_corpus("test")}  # held out means unseen


def test_tfidf_rows_are_unit_and_idf_favours_rare_words():
    v = TfidfVectorizer().fit(["the cat", "the dog", "the def"])
    x = v.transform(["the cat", "zebra"])
    assert abs(float((x[0] ** 2).sum()) - 1) < 1e-5
    assert float(abs(x[1]).sum()) == 0  # nothing known: a zero row, no crash
    assert v.idf[v.vocab["cat"]] > v.idf[v.vocab["the"]]


@pytest.mark.parametrize("cls", [LinearRouter, KMeansRouter])
def test_classifiers_separate_a_hand_made_toy_set(cls):
    texts = ["def f(x): return x", "import os; print(os.path)", "class A: pass",
             "tell me a story about a cat", "how was your day today", "write me a poem",
             "the timeout option sets seconds", "install with pip; see the changelog",
             "the config field accepts json"]
    labels = ["code"] * 3 + ["chat"] * 3 + ["docs"] * 3
    # k-means with one cluster per prompt: each cluster must take its own prompt's label
    clf = cls(texts, labels, **({"clusters_per_label": 3} if cls is KMeansRouter else {}))
    assert [clf.predict(t) for t in texts] == labels  # a training set this clear is learned
    assert clf.predict("def g(y): return y") == "code"


def test_linear_router_beats_chance_on_held_out_prompts():
    clf = train("linear")
    rows = load_corpus("test")
    acc = sum(clf.predict(t) == d for t, d in rows) / len(rows)
    assert acc > 0.7  # measured 0.89; chance is 1/3


def test_readme_router_maps_domains_through_the_router_softmax():
    torch.manual_seed(0)
    r = Router(RouterConfig(dim=16, num_layers=1, num_heads=2, ffn_dim=32, max_position=64),
               50, 3, 2, "global")
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
        r.head.zero_()
        r.head[0] += 5 * r.norm.sign()  # expert 0 ("code") wins for every token
    clf = ReadmeDomainRouter(r, lambda s: [ord(c) % 50 for c in s],
                             ["code", "conversation", "legal"], DOMAINS)
    dist = clf.domain_distribution("anything")
    assert abs(float(dist.sum()) - 1) < 1e-5 and int(dist.argmax()) == 0
    assert clf.predict("anything") == "code"
    with pytest.raises(Exception, match="names 2 domains"):
        ReadmeDomainRouter(r, str.encode, ["code", "docs"], DOMAINS)


def test_default_table_sends_code_to_the_coder():
    assert default_table([CHAT, CODER]) == {"code": CODER, "chat": CHAT, "docs": CHAT}
    assert default_table([CHAT]) == {"code": CHAT, "chat": CHAT, "docs": CHAT}


def test_router_times_its_choice_and_random_is_uniform_over_models():
    ticks = iter([1.0, 1.25])
    pr = PromptRouter(train("linear"), default_table([CHAT, CODER]), [CHAT, CODER],
                      clock=lambda: next(ticks))
    d = pr.choose("def add(a, b):\n    return a + b")
    assert (d.model, d.label, d.seconds) == (CODER, "code", 0.25)
    rnd = RandomClassifier([CHAT, CODER], seed=1)
    picks = [rnd.predict("x") for _ in range(400)]
    assert 150 < picks.count(CODER) < 250


def test_route_file_toml_and_json(tmp_path):
    t = tmp_path / "r.toml"
    t.write_text(f'models = ["{CHAT}", "{CODER}"]\nroute = "kmeans"\n[table]\ndocs = "{CODER}"\n')
    spec = read_route_file(t)
    assert spec.kind == "kmeans" and spec.table == {"code": CODER, "chat": CHAT, "docs": CODER}
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"models": [CHAT], "route": "auto"}))
    assert read_route_file(j).kind == "linear"


@pytest.mark.parametrize("body, match", [
    ({"route": "auto"}, "models: missing"),
    ({"models": []}, "models: expected a non-empty list"),
    ({"models": ["a", "a"]}, "models: expected each model once"),
    ({"models": ["auto"]}, "other than 'auto'"),
    ({"models": ["a"], "route": "tfidf"}, "route: expected one of linear"),
    ({"models": ["a"], "seed": "1"}, "seed: expected an integer"),
    ({"models": ["a"], "table": {"maths": "a"}}, r"table.maths: expected one of the labels"),
    ({"models": ["a"], "table": {"code": "b"}}, r"table.code: expected one of the models a"),
    ({"models": ["a"], "readme_model": "b"}, "readme_model: expected one of the models"),
    ({"models": ["a"], "domain_labels": {"legal": "law"}}, r"domain_labels.legal: expected"),
    ({"models": ["a"], "modles": 1}, r"unknown field\(s\) \['modles'\]"),
])
def test_route_file_errors_name_the_file_and_field(tmp_path, body, match):
    p = tmp_path / "route.json"
    p.write_text(json.dumps(body))
    with pytest.raises(RouteFileError, match=match) as e:
        read_route_file(p)
    assert str(p) in str(e.value)


def test_route_file_unreadable_or_malformed(tmp_path):
    with pytest.raises(RouteFileError, match="cannot read"):
        read_route_file(tmp_path / "nope.json")
    bad = tmp_path / "r.toml"
    bad.write_text("models = [")
    with pytest.raises(RouteFileError, match="not valid TOML"):
        read_route_file(bad)
    with pytest.raises(RouteFileError, match="--route: route: expected"):
        spec_from(["a"], "nope")
