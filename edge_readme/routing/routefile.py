"""The route file (`serve --route-file FILE`, JSON or TOML): models, router kind and label table,
checked field by field. Every error names the file, the field, what was expected and what was
found. Example (TOML):

    models = ["smollm2-135m-readme", "qwen2.5-coder-0.5b-readme"]
    route = "linear"                     # linear | kmeans | readme | random | auto (= linear)
    readme_model = "smollm2-135m-readme"  # whose router the readme kind reads [first model]
    seed = 0
    [table]                               # label -> model [code to a *coder* model, rest first]
    code = "qwen2.5-coder-0.5b-readme"
    chat = "smollm2-135m-readme"
    docs = "smollm2-135m-readme"
    [domain_labels]                       # Read-ME domain -> label, for the readme kind
    legal = "docs"
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import EdgeReadmeError
from .corpus import DOMAINS
from .policy import KINDS, default_table

FIELDS = ("models", "route", "readme_model", "seed", "table", "domain_labels")


class RouteFileError(EdgeReadmeError):
    """A route file that cannot be read or has a bad field."""


@dataclass(frozen=True)
class RouteSpec:
    models: tuple[str, ...]
    kind: str = "linear"
    table: dict[str, str] = field(default_factory=dict)
    readme_model: str | None = None
    seed: int = 0
    domain_labels: dict[str, str] = field(default_factory=dict)


def spec_from(models: list[str] | tuple[str, ...], kind: str = "auto", seed: int = 0,
              table: dict[str, str] | None = None, readme_model: str | None = None,
              domain_labels: dict[str, str] | None = None, where: str = "--route") -> RouteSpec:
    """A checked RouteSpec (from flags or a parsed file); `where` prefixes every error."""
    def fail(name: str, expected: str, found: Any) -> RouteFileError:
        return RouteFileError(f"{where}: {name}: expected {expected}, found {found!r}")

    if not isinstance(models, (list, tuple)) or not models \
            or not all(isinstance(m, str) and m for m in models):
        raise fail("models", "a non-empty list of model names", models)
    if len(set(models)) != len(models):
        raise fail("models", "each model once", models)
    if "auto" in models:
        raise fail("models", "model names other than 'auto' (it names the router)", models)
    if kind not in (*KINDS, "auto"):
        raise fail("route", "one of " + ", ".join((*KINDS, "auto")), kind)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail("seed", "an integer", seed)
    full = default_table(models)
    if table is not None:
        if not isinstance(table, dict):
            raise fail("table", f"a table of labels ({', '.join(DOMAINS)}) -> model", table)
        for lab, m in table.items():
            if lab not in DOMAINS:
                raise fail(f"table.{lab}", "one of the labels " + ", ".join(DOMAINS), lab)
            if m not in models:
                raise fail(f"table.{lab}", "one of the models " + ", ".join(models), m)
        full.update(table)
    if readme_model is not None and readme_model not in models:
        raise fail("readme_model", "one of the models " + ", ".join(models), readme_model)
    labels = {}
    if domain_labels is not None:
        if not isinstance(domain_labels, dict):
            raise fail("domain_labels", "a table of Read-ME domain -> label", domain_labels)
        for d, lab in domain_labels.items():
            if lab not in DOMAINS:
                raise fail(f"domain_labels.{d}", "one of " + ", ".join(DOMAINS), lab)
        labels = dict(domain_labels)
    return RouteSpec(tuple(models), "linear" if kind == "auto" else kind, full, readme_model,
                     seed, labels)


def read_route_file(path: str | Path) -> RouteSpec:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise RouteFileError(f"{p}: cannot read the route file ({e.strerror}); check the "
                             "path") from None
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        form = "TOML" if p.suffix.lower() == ".toml" else "JSON (name it .toml for TOML)"
        raise RouteFileError(f"{p}: not valid {form}: {e}") from None
    if not isinstance(data, dict):
        raise RouteFileError(f"{p}: expected a table/object at the top, found "
                             f"{type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RouteFileError(f"{p}: unknown field(s) {unknown}; the fields are "
                             + ", ".join(FIELDS))
    if "models" not in data:
        raise RouteFileError(f"{p}: models: missing; list the models to serve, e.g. "
                             "models = [\"smollm2-135m-readme\"]")
    return spec_from(data["models"], data.get("route", "auto"), data.get("seed", 0),
                     data.get("table"), data.get("readme_model"), data.get("domain_labels"),
                     where=str(p))
