"""Which model serves a prompt: a classifier's label mapped to a model, timed per call.

`PromptRouter` joins a classifier (TF-IDF k-means, TF-IDF linear, Read-ME domains, or seeded
random choice for comparison) with a table label -> model name. The default table sends code to
a model whose name says it codes (`coder`, `code`) and everything else to the first model.
This module knows names and text, not engines or HTTP.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ..errors import EdgeReadmeError
from .corpus import DOMAINS, load_corpus
from .tfidf import KMeansRouter, LinearRouter

KINDS = ("linear", "kmeans", "readme", "random")  # "auto" = linear


@dataclass(frozen=True)
class Decision:
    model: str
    label: str
    seconds: float  # time the classifier took


def default_table(models: Sequence[str]) -> dict[str, str]:
    """code -> the first model named like a coder (if any); chat and docs -> the first model
    that is not one (else the first model)."""
    if not models:
        raise EdgeReadmeError("routing needs at least one model (-m NAME)")
    coders = [m for m in models if "code" in m.lower()]
    others = [m for m in models if m not in coders] or list(models)
    return {"code": (coders or others)[0], "chat": others[0], "docs": others[0]}


def train(kind: str, seed: int = 0):
    """A TF-IDF classifier trained on the corpus's train split."""
    rows = load_corpus("train")
    texts, labels = [t for t, _ in rows], [d for _, d in rows]
    if kind == "linear":
        return LinearRouter(texts, labels)
    if kind == "kmeans":
        return KMeansRouter(texts, labels, seed=seed)
    raise EdgeReadmeError(f"route kind {kind!r} is not a TF-IDF kind; expected linear or kmeans")


class RandomClassifier:
    """A uniformly random model per prompt, seeded: the baseline a router must beat. Its
    `predict` answers a model name, not a label."""

    kind = "random"

    def __init__(self, models: Sequence[str], seed: int = 0):
        self.models, self._rng, self._lock = list(models), random.Random(seed), threading.Lock()

    def predict(self, text: str) -> str:
        with self._lock:
            return self._rng.choice(self.models)


class PromptRouter:
    def __init__(self, classifier, table: Mapping[str, str], models: Sequence[str],
                 clock: Callable[[], float] = time.perf_counter):
        missing = [lab for lab in DOMAINS if lab not in table]
        unknown = {lab: m for lab, m in table.items() if m not in models}
        if missing or unknown:
            raise EdgeReadmeError(f"route table: labels {missing} have no model and {unknown} "
                                  f"name models not served (served: {list(models)})")
        self.classifier, self.table, self.models, self.clock = classifier, dict(table), \
            list(models), clock
        self.kind = getattr(classifier, "kind", type(classifier).__name__)

    def choose(self, text: str) -> Decision:
        t0 = self.clock()
        label = self.classifier.predict(text)
        model = label if isinstance(self.classifier, RandomClassifier) else self.table[label]
        return Decision(model, label, self.clock() - t0)


def build(spec, readme_source: Callable[[str], object] | None = None) -> PromptRouter:
    """The PromptRouter a RouteSpec describes. For the readme kind, `readme_source(model)` gives
    that model's ReadmeDomainRouter (the server builds it from the loaded engine; by default it
    is read from the model's files)."""
    labels = list(DOMAINS)
    if spec.kind in ("linear", "kmeans"):
        clf = train(spec.kind, spec.seed)
    elif spec.kind == "random":
        clf = RandomClassifier(spec.models, spec.seed)
    elif spec.kind == "readme":
        name = spec.readme_model or spec.models[0]
        if readme_source is None:
            from ..registry import resolve
            from .readme_domains import from_model

            clf = from_model(resolve(name), labels, spec.domain_labels)
        else:
            clf = readme_source(name)
    else:
        raise EdgeReadmeError(f"--route: unknown kind {spec.kind!r}; use one of "
                              + ", ".join((*KINDS, "auto")))
    return PromptRouter(clf, spec.table, spec.models)
