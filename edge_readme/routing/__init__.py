"""Prompt-level routing (the Expert Router paper): which of several served models answers a
prompt, and how one memory budget is split among them.

- `corpus`: the built-in labelled prompts (code, chat, docs) with a held-out split;
- `tfidf`: the paper's TF-IDF + k-means gateway and a TF-IDF linear classifier (numpy);
- `readme_domains`: a classifier from a Read-ME router's domain distribution over the prompt;
- `policy`: label -> model, timed per prompt, plus the seeded random baseline;
- `routefile`: the route file, checked field by field;
- `fleet`: one memory budget split across the models' plans.

The package knows text, model names and memory plans; the server wires it to engines.
"""

from .corpus import DOMAINS, load_corpus
from .policy import KINDS, Decision, PromptRouter, RandomClassifier, build, default_table, train
from .routefile import RouteFileError, RouteSpec, read_route_file, spec_from

__all__ = ["DOMAINS", "KINDS", "Decision", "PromptRouter", "RandomClassifier", "RouteFileError",
           "RouteSpec", "build", "default_table", "load_corpus", "read_route_file", "spec_from",
           "train"]
