"""Question-set accuracy and loops per sampling setting, MoE and dense side by side.

Chooses the chat / server anti-repetition defaults (edge_readme/sampling.py CHAT_PENALTIES):
every setting answers the same question set with the same models; sampled settings are seeded
and averaged over --seeds runs. Prints one JSON line per (model, setting), then a table.

    python benchmarks/chat_defaults.py --models smollm2-135m-readme,smollm2-135m
    python benchmarks/chat_defaults.py --set benchmarks/chat_set/heldout.jsonl --settings greedy
"""

from __future__ import annotations

import json
import time

import click

from edge_readme import Engine
from edge_readme.refactor.chatset import MAX_TOKENS, ask, load_chat_set, score

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "greedy+rep1.1": dict(temperature=0.0, repetition_penalty=1.1),
    "greedy+rep1.3": dict(temperature=0.0, repetition_penalty=1.3),
    "greedy+ngram3": dict(temperature=0.0, no_repeat_ngram=3),
    "t0.7": dict(temperature=0.7, top_p=0.9, repetition_penalty=1.0),
    "t0.7+rep1.1": dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
    "t0.7+rep1.3": dict(temperature=0.7, top_p=0.9, repetition_penalty=1.3),
    "t0.7+ngram3": dict(temperature=0.7, top_p=0.9, no_repeat_ngram=3),
}


@click.command()
@click.option("--models", default="smollm2-135m-readme,smollm2-135m")
@click.option("--set", "path", default=None, help="question set (default: the built-in one)")
@click.option("--settings", default=",".join(SETTINGS), help="comma-separated, of: "
              + ", ".join(SETTINGS))
@click.option("--seeds", default=2, help="runs per sampled setting (seeds 0..N-1)")
@click.option("--max-tokens", default=MAX_TOKENS)
def main(models: str, path: str | None, settings: str, seeds: int, max_tokens: int) -> None:
    questions = load_chat_set(path)
    table = {}
    for model in models.split(","):
        with Engine.load(model, device="cpu") as engine:
            for name in settings.split(","):
                kw = SETTINGS[name]
                runs = [None] if kw["temperature"] == 0 else list(range(seeds))
                t = time.time()
                scores = [score(ask(engine, questions, max_tokens, progress=False,
                                    **({**kw, "seed": s} if s is not None else kw)))
                          for s in runs]
                row = {"model": model, "setting": name, "runs": len(runs),
                       "correct": sum(s["correct"] for s in scores) / len(runs),
                       "total": scores[0]["total"],
                       "loops": sum(s["loops"] for s in scores) / len(runs),
                       "s": round(time.time() - t)}
                print(json.dumps(row), flush=True)
                table[(model, name)] = row
    names = models.split(",")
    print("\n| setting | " + " | ".join(f"{m} correct (loops)" for m in names) + " |")
    print("|---|" + "---|" * len(names))
    for name in settings.split(","):
        cells = [f"{table[(m, name)]['correct']:.1f}/{table[(m, name)]['total']} "
                 f"({table[(m, name)]['loops']:.1f})" for m in names]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
