"""`edge-readme refactor` (dense -> Read-ME MoE) and `edge-readme eval` (quality against dense)."""

from __future__ import annotations

import json

import click

from .common import friendly


@click.command("refactor")
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--data", multiple=True, type=click.Path(),
              help="Calibration data: one domain per text file, or JSONL with a 'domain' field. "
                   "Default: the built-in five-domain corpus.")
@click.option("--experts", type=click.IntRange(2, 256), default=None,
              help="Number of routed experts (default: one per domain; else k-means clusters).")
@click.option("--active-fraction", type=float, default=0.5, show_default=True,
              help="Share of each layer's FFN neurons a domain keeps, in (0, 1].")
@click.option("--layer-allocation", "allocation", type=click.Choice(["sensitivity", "uniform"]),
              default="sensitivity", show_default=True,
              help="Spread the active neurons over layers by measured sensitivity (the mean "
                   "stays --active-fraction), or keep the same share in every layer.")
@click.option("--recovery", type=click.Choice(["none", "refit"]), default="refit",
              show_default=True, help="Training-free recovery of the sliced experts.")
@click.option("--finetune-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Alternating router/expert distillation steps (0 = off).")
@click.option("--delta-rank", type=click.IntRange(0), default=0, show_default=True,
              help="With --finetune-steps: train rank-R corrections to every expert (small "
                   "enough to ship) instead of the full expert weights (0 = full weights).")
@click.option("--routing", type=click.Choice(["global", "per_layer"]), default="global",
              show_default=True, help="One expert for every layer (Read-ME) or a per-layer path.")
@click.option("--seq-len", type=click.IntRange(16), default=256, show_default=True)
@click.option("--sequences-per-domain", type=click.IntRange(1), default=16, show_default=True)
@click.option("--router-steps", type=click.IntRange(0), default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--expert-format", type=click.Choice(["auto", "q4", "f16", "bf16", "f32"]),
              default="auto", show_default=True,
              help="How experts and projections are stored: q4 (int4 group-wise, GGUF 4-bit "
                   "values kept exactly), a float dtype, or auto (q4 where the hidden size is a "
                   "multiple of 64, else f16).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly
def refactor_command(model: str, out: str, data: tuple[str, ...], experts: int | None,
                     active_fraction: float, allocation: str, recovery: str,
                     finetune_steps: int, delta_rank: int, routing: str,
                     seq_len: int, sequences_per_domain: int, router_steps: int, seed: int,
                     expert_format: str, force: bool, as_json: bool) -> None:
    """Refactor the dense MODEL into a router-decoupled MoE folder OUT (Read-ME)."""
    from ..refactor.pipeline import refactor
    from ..registry import resolve

    report = refactor(resolve(model), out, data=list(data) or None, experts=experts,
                      active_fraction=active_fraction, allocation=allocation,
                      finetune_steps=finetune_steps, delta_rank=delta_rank,
                      recovery=recovery, seq_len=seq_len,
                      sequences_per_domain=sequences_per_domain, seed=seed, force=force,
                      routing=routing, router_steps=router_steps, expert_format=expert_format)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"wrote {out}")
    for key in ("domains", "router_accuracy", "params"):
        if key in report:
            click.echo(f"  {key}: {report[key]}")


@click.command("eval")
@click.argument("model")
@click.option("--data", multiple=True, type=click.Path(),
              help="Held-out data (text files or JSONL), held out whole; default: the built-in "
                   "held-out split.")
@click.option("--reference", default=None, help="The dense model to compare against.")
@click.option("--seq-len", type=click.IntRange(16), default=256, show_default=True)
@click.option("--sequences-per-domain", type=click.IntRange(1), default=4, show_default=True)
@click.option("--weights", type=click.Choice(["q4", "q8", "bf16", "f16", "f32"]), default=None,
              help="Evaluate both models in this runtime weight format (default: float32).")
@click.option("--chat-set", is_flag=False, flag_value="builtin", default=None,
              metavar="[FILE]", help="Instead of perplexity: score greedy chat answers on the "
              "question set (built-in 40 prompts, or a JSONL FILE), MODEL and --reference "
              "side by side.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="Reply length for --chat-set.")
@click.option("--repetition-penalty", type=click.FloatRange(0, 10, min_open=True), default=1.0,
              show_default=True, help="For --chat-set (1 = off).")
@click.option("--no-repeat-ngram", type=click.IntRange(0), default=0, show_default=True,
              help="For --chat-set (0 = off).")
@click.option("--json", "as_json", is_flag=True)
@friendly
def eval_command(model: str, data: tuple[str, ...], reference: str | None, seq_len: int,
                 sequences_per_domain: int, weights: str | None, chat_set: str | None,
                 max_tokens: int, repetition_penalty: float, no_repeat_ngram: int,
                 as_json: bool) -> None:
    """Per-domain held-out perplexity of a MoE MODEL, against a dense --reference; or, with
    --chat-set, the share of chat questions each answers correctly."""
    import dataclasses

    from ..refactor.corpus import load_user_data
    from ..refactor.evaluate import evaluate
    from ..registry import resolve

    if chat_set is not None:
        _chat_set(model, reference, None if chat_set == "builtin" else chat_set, max_tokens,
                  repetition_penalty, no_repeat_ngram, as_json)
        return

    # a file given here is held-out data as a whole (no 80/20 split as for calibration data)
    docs = [dataclasses.replace(d, split="heldout") for d in load_user_data(list(data))] \
        if data else None
    ref = resolve(reference) if reference else None
    report = evaluate(resolve(model), docs=docs, reference=ref, seq_len=seq_len,
                      sequences_per_domain=sequences_per_domain, weights=weights)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'domain':<16}{'moe ppl':>10}{'dense ppl':>11}{'ratio':>8}")
    for name, row in report["domains"].items():
        moe, dense, ratio = (row.get(k, float("nan")) for k in ("moe_ppl", "dense_ppl", "ratio"))
        click.echo(f"{name:<16}{moe:>10.2f}{dense:>11.2f}{ratio:>8.3f}")
    for key in ("mean_ratio", "max_ratio", "router_accuracy", "teacher_forced_agreement",
                "greedy_prefix_agreement"):
        if key in report:
            click.echo(f"{key}: {report[key]:.3f}")


def _chat_set(model, reference, path, max_tokens, repetition_penalty, no_repeat_ngram,
              as_json) -> None:
    from ..refactor.chatset import chat_eval, load_chat_set

    load_chat_set(path)  # a bad file fails before any model loads
    report = chat_eval(model, reference, path, max_tokens,
                       repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    roles = [r for r in ("moe", "dense") if r in report]
    names = {"moe": model, "dense": reference}
    click.echo(f"{'question':<18}" + "".join(f"{names[r][:24]:>26}" for r in roles))
    for item in report["items"]:
        click.echo(f"{item['id']:<18}" + "".join(
            f"{'right' if item[r + '_correct'] else 'wrong':>26}" for r in roles))
    for r in roles:
        s = report[r]
        cats = ", ".join(f"{k} {v}" for k, v in s["by_category"].items())
        click.echo(f"{names[r]}: {s['correct']}/{s['total']} ({s['accuracy']:.0%}; {cats}; "
                   f"replies that loop: {s['loops']})")
    if report.get("relative") is not None:
        click.echo(f"{model} answers {report['relative']:.0%} as many as {reference}")
