"""Prompt classifiers over TF-IDF features, in numpy: the Expert Router paper's TF-IDF + k-means
gateway, and a linear (softmax regression) classifier, both trained on the built-in corpus.

Features are words and the punctuation marks code is made of (`(`, `:`, `{`, `=`...), counted
with sublinear tf, weighted by smoothed idf and scaled to unit length. Training is seeded and
takes milliseconds, so a router is trained when a server starts; nothing is stored.
This module knows text and labels only, never models or HTTP.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z_][a-z0-9_]*|\d+|[^\sa-z0-9_]")


def tokens(text: str) -> list[str]:
    """Lower-cased words, numbers and single punctuation marks, plus word bigrams."""
    toks = _TOKEN.findall(text.lower())
    return toks + [f"{a} {b}" for a, b in zip(toks, toks[1:])]


class TfidfVectorizer:
    """Vocabulary and idf from a training set; `transform` gives unit rows [N, V] (float32)."""

    def __init__(self, min_df: int = 1):
        self.min_df = min_df
        self.vocab: dict[str, int] = {}
        self.idf = np.zeros(0, dtype=np.float32)

    def fit(self, texts: Sequence[str]) -> "TfidfVectorizer":
        df = Counter(t for text in texts for t in set(tokens(text)))
        kept = sorted(t for t, n in df.items() if n >= self.min_df)
        self.vocab = {t: i for i, t in enumerate(kept)}
        n = len(texts)
        self.idf = np.array([math.log((1 + n) / (1 + df[t])) + 1 for t in kept], np.float32)
        return self

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.vocab)), np.float32)
        for r, text in enumerate(texts):
            for t, c in Counter(tokens(text)).items():
                j = self.vocab.get(t)
                if j is not None:
                    x[r, j] = 1 + math.log(c)
        x *= self.idf
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-12)


class _Classifier:
    labels: list[str]
    vec: TfidfVectorizer

    def scores(self, texts: Sequence[str]) -> np.ndarray:  # [N, labels], higher is likelier
        raise NotImplementedError

    def predict(self, text: str) -> str:
        return self.labels[int(np.argmax(self.scores([text])[0]))]


class KMeansRouter(_Classifier):
    """The paper's gateway: k-means over TF-IDF rows (k-means++ start, cosine distance); each
    cluster takes the majority label of its training prompts; a prompt goes to its nearest
    centroid's label."""

    kind = "kmeans"

    def __init__(self, texts: Sequence[str], labels: Sequence[str], clusters_per_label: int = 12,
                 seed: int = 0, iterations: int = 50):
        self.labels = sorted(set(labels))
        self.vec = TfidfVectorizer().fit(texts)
        x = self.vec.transform(texts)
        k = min(len(texts), clusters_per_label * len(self.labels))
        rng = np.random.default_rng(seed)
        centres = x[[int(rng.integers(len(x)))]]
        while len(centres) < k:  # k-means++: far points are likelier next centres
            d = 1 - (x @ centres.T).max(axis=1)
            p = np.maximum(d, 0) ** 2
            pick = int(rng.choice(len(x), p=p / p.sum())) if p.sum() > 0 else \
                int(rng.integers(len(x)))
            centres = np.vstack([centres, x[pick]])
        for _ in range(iterations):
            assign = np.argmax(x @ centres.T, axis=1)
            new = np.stack([x[assign == c].mean(0) if (assign == c).any() else centres[c]
                            for c in range(k)])
            new /= np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-12)
            if np.allclose(new, centres):
                break
            centres = new
        self.centres = centres
        assign = np.argmax(x @ centres.T, axis=1)
        idx = {lab: i for i, lab in enumerate(self.labels)}
        self.cluster_label = np.zeros(k, dtype=np.int64)
        for c in range(k):
            members = [idx[lab] for lab, a in zip(labels, assign) if a == c]
            self.cluster_label[c] = Counter(members).most_common(1)[0][0] if members else 0

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        sim = self.vec.transform(texts) @ self.centres.T  # [N, k]
        out = np.full((len(texts), len(self.labels)), -np.inf, np.float32)
        for c, lab in enumerate(self.cluster_label):
            out[:, lab] = np.maximum(out[:, lab], sim[:, c])
        return out


class LinearRouter(_Classifier):
    """Softmax regression on TF-IDF rows, full-batch gradient descent with L2 (seeded)."""

    kind = "linear"

    def __init__(self, texts: Sequence[str], labels: Sequence[str], steps: int = 300,
                 lr: float = 2.0, l2: float = 1e-3):
        self.labels = sorted(set(labels))
        self.vec = TfidfVectorizer().fit(texts)
        x = self.vec.transform(texts)
        y = np.array([self.labels.index(lab) for lab in labels])
        onehot = np.eye(len(self.labels), dtype=np.float32)[y]
        self.w = np.zeros((x.shape[1], len(self.labels)), np.float32)
        self.b = np.zeros(len(self.labels), np.float32)
        for _ in range(steps):
            p = _softmax(x @ self.w + self.b)
            g = (p - onehot) / len(x)
            self.w -= lr * (x.T @ g + l2 * self.w)
            self.b -= lr * g.sum(0)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        return _softmax(self.vec.transform(texts) @ self.w + self.b)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
