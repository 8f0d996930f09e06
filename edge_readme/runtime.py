"""The runtime under a memory budget: backbone, KV cache, router, expert cache and prefetcher.

`Runtime` turns token ids into logits: one forward pass over whatever batch of sequence slots it
is handed (the scheduler in `scheduler.py` decides the batch); it knows nothing about text, threads
or HTTP. For a Read-ME MoE the router gives every token's whole expert path before the backbone
runs, so each step first tells the cache the known future (Belady's lookahead) and queues the loads
(the prefetcher), then computes, waiting only for experts not yet resident.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import quant
from .budget import MemoryPlan, auto_budget, parse_budget, plan_memory
from .cache.expert_cache import packed_nbytes, slot_nbytes
from .config import ModelConfig
from .errors import BudgetError, EdgeReadmeError
from .experts_format import align_up, read_manifest
from .loader import LoadedModel, row_file, shape_of
from .model import KVCache, Segment, build_transformer, spec_shape, weight_specs
from .quant.lowbit import parse_miss_precision
from .rowfile import RowFile
from .threads import Anchor

Key = tuple[int, int]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"
    dtype: str | None = None  # default: float32 on CPU, float16 on CUDA/MPS
    context_length: int = 2048
    memory_budget: int | str | None = None  # bytes, "512MiB", "auto", or None (no cap)
    policy: str = "belady"
    prefetch: bool = True
    speculate: int = 4  # top-k next-token candidates whose router paths are prefetched; 0 = off
    speculate_layers: int = 4  # how many first layers of the likeliest path to prefetch
    verify: bool = False
    cold: bool = False
    threads: int | None = None
    prefill_chunk: int = 256
    weights: str | None = None  # q4, q8, bf16, f16, f32 (None: --dtype's, else per device)
    quantize: str | None = None  # "int8": the old spelling of weights="q8"
    max_batch: int = 1  # sequence slots: each has its own KV cache, counted in the plan
    miss_precision: str | None = None  # q2, q3, q4: a miss computes with a low-bit copy (inexact)
    embeddings: str = "file"  # "file": lookup-only tables are read by row from the model file


@dataclass
class StepStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    reused_tokens: int = 0
    speculations: int = 0
    speculations_right: int = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EdgeReadmeError(f"--device: unknown device {name!r}; use auto, cpu, cuda, "
                              "cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EdgeReadmeError("--device cuda: no CUDA device is available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise EdgeReadmeError("--device mps: MPS is not available here; use --device cpu")
    return dev


def pick_dtype(name: str | None, device: torch.device, quantize: str | None = None) -> torch.dtype:
    return pick_format(RuntimeOptions(dtype=name, quantize=quantize), device)[1]


def pick_format(o: RuntimeOptions, device: torch.device) -> tuple[str, torch.dtype]:
    """(weight format, compute dtype) from --weights, or the older --dtype / --quantize."""
    if o.dtype is not None and o.dtype not in DTYPES:
        raise EdgeReadmeError(f"--dtype: unknown dtype {o.dtype!r}; use float32, bfloat16 or "
                              "float16")
    if o.quantize not in (None, "int8"):
        raise EdgeReadmeError(f"--quantize: unknown {o.quantize!r}; the choice is int8")
    if o.weights is not None:
        fmt = quant.parse_format(o.weights)
    elif o.quantize == "int8":
        fmt = "q8"
    elif o.dtype is not None:
        fmt = quant.parse_format(o.dtype)
    else:
        fmt = quant.default_format(device)
    if o.dtype is not None and (o.weights is not None or o.quantize):
        if fmt in ("q4", "q8") or quant.parse_format(o.dtype) != fmt:
            raise EdgeReadmeError(f"--dtype {o.dtype} conflicts with --weights {fmt}: q4 and q8 "
                                  "pick their own activation dtype, and a float format is its "
                                  "own dtype; pass only --weights")
    quant.check_device(fmt, device)
    return fmt, quant.compute_dtype(fmt, device)


def expert_slot(manifest, fmt: str, device: torch.device, dtype: torch.dtype) -> tuple[str, int]:
    """('q4' | 'float', bytes per slot): q4 experts stay 4-bit in CPU slots for the quantized
    formats; otherwise slots hold floats in the compute dtype (q4 files are dequantized on fill)."""
    form = "q4" if manifest.expert_format == "q4" and fmt in ("q4", "q8") \
        and device.type == "cpu" else "float"
    return form, slot_nbytes(manifest, form, dtype, quant.act_dtype(fmt, device))


def context_limit(c: ModelConfig, asked: int) -> int:
    limit = min(asked, c.max_position)
    return min(limit, c.moe.router.max_position) if c.moe is not None else limit


EMBEDDINGS = ("file", "memory")


def tables_in_file(loaded: LoadedModel, o: RuntimeOptions, fmt: str) -> dict[str, RowFile]:
    """The lookup tables that stay in the model file (0 bytes in the plan), by tensor name: the
    token embedding when the head is a matrix of its own, and the router's embedding. Each
    lookup reads its rows (`rowfile`), and the values are those the in-memory table holds."""
    if o.embeddings not in EMBEDDINGS:
        raise EdgeReadmeError(f"--embeddings: expected one of {', '.join(EMBEDDINGS)}, got "
                              f"{o.embeddings!r}")
    if o.embeddings == "memory":
        return {}
    c, names = loaded.config, []
    if not c.tie_embeddings:
        names.append("model.embed_tokens.weight")
    if c.moe is not None:
        names.append("router.embed")
    found = {n: row_file(loaded.tensors, n) for n in names}
    return {n: r for n, r in found.items() if r is not None}


def check_budget(budget) -> int:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise BudgetError(f"memory budget: expected a positive byte count, got {budget!r}")
    return budget


def plan_for(loaded: LoadedModel, manifest, o: RuntimeOptions, device: torch.device,
             dtype: torch.dtype, context_length: int, fmt: str | None = None) -> MemoryPlan:
    """Split the budget: dense weights, KV cache, scratch, then as many expert slots as fit."""
    c, item = loaded.config, dtype.itemsize
    fmt = fmt or pick_format(o, device)[0]
    dense_bytes = 2 * context_length * c.head_dim * item  # rope tables
    in_file = tables_in_file(loaded, o, fmt)
    for path, name, make, role in weight_specs(c, loaded.tensors, fmt):
        shape = spec_shape(c, loaded.tensors, path, name, fmt)
        if name == "embed" and "model.embed_tokens.weight" in in_file:
            continue  # read by row from the file
        if role == "norm":
            dense_bytes += shape[0] * item
        else:
            four = role == "down" and quant.four_bit(fmt, make(), role)
            dense_bytes += quant.planned_nbytes(fmt, shape, role, device, four)
    dense_bytes += sum(math.prod(shape_of(loaded.tensors, n)) * 4 for n in loaded.tensors
                       if n.startswith("router.") and n not in in_file)  # float32
    seqs = max(1, o.max_batch)  # one KV cache (and router cache) per sequence slot
    if c.moe is not None:  # the router's rope tables, and its keys/values for the context
        r = c.moe.router
        dense_bytes += 2 * r.max_position * (r.dim // r.num_heads) * 4
        dense_bytes += seqs * 2 * r.num_layers * context_length * r.dim * 4
    kv_item = quant.kv_dtype(fmt, device).itemsize
    kv_bytes = seqs * 2 * c.num_layers * c.num_kv_heads * context_length * c.head_dim * kv_item
    chunk = min(o.prefill_chunk, context_length)
    width = c.hidden_size * 4 + c.q_dim + 2 * c.kv_dim + 3 * c.intermediate_size
    scratch = chunk * width * item + c.num_heads * chunk * context_length * 4  # activations
    scratch += c.vocab_size * 4 * 2  # last logits, sampling
    slot_bytes, keys = 0, 0
    if manifest is not None:
        form, slot_bytes = expert_slot(manifest, fmt, device, dtype)
        keys = len(manifest.entries)
        if form == "float" or device.type != "cpu":
            scratch += 2 * align_up(manifest.max_length)  # staging buffers for reads
        if parse_miss_precision(o.miss_precision):  # low-bit copies of all experts, resident
            from .cache import miss_precision as mp

            mp.check(manifest, device)
            dense_bytes += mp.copies_nbytes(manifest, o.miss_precision)
            scratch += mp.scratch_nbytes(manifest, quant.act_dtype(fmt, device))
    elif parse_miss_precision(o.miss_precision):
        raise EdgeReadmeError("--miss-precision: the model is dense (no routed experts to "
                              "miss); leave it off")
    budget = o.memory_budget
    if isinstance(budget, str):
        budget = parse_budget(budget) if budget != "auto" else None
        if budget is None:
            budget = auto_budget(device)
    packed = None  # on the CPU a budget that holds every expert packs them by their sizes
    if manifest is not None and device.type == "cpu":
        packed = packed_nbytes(manifest, form, dtype, quant.act_dtype(fmt, device))
    if budget is None:  # no cap: everything resident
        budget = dense_bytes + kv_bytes + scratch + (keys * slot_bytes if packed is None
                                                     else packed)
    check_budget(budget)
    return plan_memory(dense_bytes, slot_bytes, keys, kv_bytes, scratch, budget, min_slots=1,
                       packed_bytes=packed)


def dry_run_plan(model: str, engine_kwargs: dict) -> dict:
    """The memory plan `generate --dry-run` prints, without putting weights on the device."""
    from .loader import load_model
    from .registry import resolve

    loaded = load_model(resolve(model))
    kw = {k: v for k, v in engine_kwargs.items() if k in RuntimeOptions.__dataclass_fields__}
    o = RuntimeOptions(**kw)
    device = pick_device(o.device)
    fmt, dtype = pick_format(o, device)
    ctx = context_limit(loaded.config, o.context_length)
    manifest = read_manifest(loaded.path) if loaded.config.moe is not None else None
    plan = plan_for(loaded, manifest, o, device, dtype, ctx, fmt)
    d = plan.to_json()
    d.update({"model": str(loaded.path), "device": str(device), "weights": fmt,
              "dtype": str(dtype).replace("torch.", ""), "context_length": ctx,
              "expert_keys": len(manifest.entries) if manifest else 0})
    return d


class SeqSlot:
    """One sequence slot: its KV cache and router cache, its tokens and their expert paths."""

    def __init__(self, kv: KVCache, router_cache, length: int, layers: int):
        self.kv, self.router_cache = kv, router_cache
        self.tokens: list[int] = []  # the sequence whose keys/values sit in kv
        self.routed = 0  # positions whose path is in routes (and whose keys in router_cache)
        self.routes = torch.zeros(length, layers, dtype=torch.long)  # [S, L]
        self.spec_guess: torch.Tensor | None = None  # the speculated path of the next token
        self.speculations = self.speculations_right = 0


class Runtime:
    def __init__(self, loaded: LoadedModel, options: RuntimeOptions = RuntimeOptions(),
                 on_progress: Callable[[str, float], None] | None = None):
        self.options = o = options
        self.config: ModelConfig = loaded.config
        if o.threads:
            torch.set_num_threads(o.threads)
        Anchor.ensure()  # decode speed independent of the loading thread (threads.py)
        self.device = pick_device(o.device)
        self.weights, self.dtype = pick_format(o, self.device)
        self.context_length = context_limit(self.config, o.context_length)
        if self.context_length < 2:
            raise EdgeReadmeError(f"--context-length: expected >= 2, got {o.context_length}")
        if not isinstance(o.max_batch, int) or isinstance(o.max_batch, bool) or o.max_batch < 1:
            raise EdgeReadmeError(f"--max-batch: expected an integer >= 1, got {o.max_batch!r}")
        self._stack = contextlib.ExitStack()
        try:
            self._build(loaded, on_progress)
        except BaseException:
            self._stack.close()
            raise
        self._queued_future: list[Key] = []

    # ------------------------------------------------------------------ construction

    def _build(self, loaded: LoadedModel, on_progress) -> None:
        c, o = self.config, self.options
        self.manifest = read_manifest(loaded.path) if c.moe is not None else None
        self.plan = plan_for(loaded, self.manifest, o, self.device, self.dtype,
                             self.context_length, self.weights)
        progress = on_progress or (lambda stage, frac: None)
        progress("weights", 0.0)
        self.in_file = tables_in_file(loaded, o, self.weights)
        for rows in self.in_file.values():
            self._stack.callback(rows.close)
        self.model = build_transformer(c, loaded.tensors, self.device, self.dtype,
                                       rope_length=self.context_length, weights=self.weights,
                                       in_file=self.in_file)
        self.router = self.cache = self.prefetcher = self.miss = None
        self.all_resident = False
        if c.moe is not None:
            self._build_moe(loaded, progress)
        kvs = KVCache.pool(c, o.max_batch, self.context_length, device=self.device,
                           dtype=quant.kv_dtype(self.weights, self.device))  # one buffer
        self.slots = [SeqSlot(kv, self.router.new_cache(self.context_length) if self.router
                              else None, self.context_length, c.num_layers) for kv in kvs]
        progress("weights", 1.0)

    def _build_moe(self, loaded: LoadedModel, progress) -> None:
        from .cache import ExpertCache, ExpertStore
        from .prefetch import Prefetcher
        from .router import Router

        c, o, m = self.config, self.options, self.manifest
        rows = self.in_file.get("router.embed")
        self.router = Router.from_tensors(
            c.moe.router, c.moe.num_experts, c.num_layers, c.moe.routing, loaded.tensors,
            self.device, embed_rows=None if rows is None else quant.FileRows(rows, "f32",
                                                                             self.device))
        store = self._stack.enter_context(ExpertStore(m, verify=o.verify, cold=o.cold))
        self.cache = self._stack.enter_context(
            ExpertCache(store, m, self.plan.slots, device=self.device, dtype=self.dtype,
                        policy=o.policy,
                        form=expert_slot(m, self.weights, self.device, self.dtype)[0],
                        kernel_dtype=quant.act_dtype(self.weights, self.device),
                        packed=self.plan.packed))
        self.model.attach_experts(self.cache)
        self.prefetcher = self._stack.enter_context(
            Prefetcher(self.cache, enabled=o.prefetch))
        if o.miss_precision and self.plan.slots < len(m.entries):
            self._build_miss(store, progress)
        if self.plan.slots >= len(m.entries):
            keys = m.keys()
            for i, key in enumerate(keys):
                with self.cache.get(*key):
                    pass
                progress("experts", (i + 1) / len(keys))
            self.cache.reset_stats()
            # all resident: no loads, evictions, prefetches or speculation from here on
            self.all_resident = self.cache.freeze()

    def _build_miss(self, store, progress) -> None:
        """--miss-precision: low-bit copies of all experts; misses of decode steps use them."""
        from .cache import miss_precision as mp
        from .prefetch import Prefetcher

        copies = mp.LowBitExperts(store, self.options.miss_precision,
                                  quant.act_dtype(self.weights, self.device), progress)
        loader = self.prefetcher if self.options.prefetch else \
            self._stack.enter_context(Prefetcher(self.cache))  # loads misses, prefetches nothing
        self.miss = mp.MissPrecision(self.cache, copies, loader)
        self.model.attach_experts(self.miss)

    def close(self) -> None:
        self._stack.close()
        from .memory import release_tensors, trim_heap

        release_tensors(self.model, self.router, *(sl.kv for sl in self.slots),
                        *(sl.router_cache for sl in self.slots))  # close() gives memory back
        trim_heap()

    # ------------------------------------------------------------------ sequence slots

    def assign(self, slot: int, ids: Sequence[int]) -> int:
        """Give `slot` to a new sequence: keep the longest cached prefix of ids; its length."""
        if len(ids) > self.context_length:
            raise EdgeReadmeError(f"prompt of {len(ids)} tokens exceeds the context length "
                                  f"{self.context_length}; shorten it or raise --context-length")
        sl, common = self.slots[slot], 0
        for a, b in zip(sl.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        sl.tokens, sl.routed, sl.spec_guess = list(ids[:common]), min(sl.routed, common), None
        return common

    def best_slot(self, ids: Sequence[int], free: Sequence[int]) -> int:
        """The free slot whose cached tokens share the longest prefix with ids (a chat's turns)."""
        def shared(i: int) -> int:
            n = 0
            for a, b in zip(self.slots[i].tokens, ids):
                if a != b:
                    break
                n += 1
            return n
        return max(free, key=shared)

    def reset(self) -> None:
        for sl in self.slots:
            sl.tokens, sl.routed, sl.spec_guess = [], 0, None

    def preroute(self, slot: int, ids: Sequence[int]) -> torch.Tensor | None:
        """Route tokens about to be appended to `slot` now, so a scheduler sees their paths."""
        if self.router is None:
            return None
        sl, pos = self.slots[slot], len(self.slots[slot].tokens)
        if pos + len(ids) > self.context_length:
            return None
        with torch.inference_mode():
            x = torch.tensor(list(ids), dtype=torch.long, device=self.device)
            sl.routes[pos:pos + len(ids)] = self.router.route(x, sl.router_cache, pos).cpu()
        sl.routed = pos + len(ids)
        return sl.routes[pos:pos + len(ids)]

    # ------------------------------------------------------------------ the forward step

    @torch.inference_mode()
    def step(self, work: Sequence[tuple[int, Sequence[int]]],
             check: Callable[[], None] | None = None, speculate: bool = False
             ) -> list[torch.Tensor]:
        """One forward pass: append work[i][1] to slot work[i][0]; the next-token logits of each.

        All tokens of the step share the projections and the expert FFNs (grouped by expert);
        attention runs per sequence. `check` runs after every layer (it may raise to cancel).
        On any error no slot changes. `speculate`: after a one-sequence decode, prefetch the
        likely next path (the scheduler's pre-routing does this for bigger batches)."""
        segs: list[Segment] = []
        ids: list[int] = []
        for slot, toks in work:
            sl = self.slots[slot]
            if len(sl.tokens) + len(toks) > self.context_length:
                raise EdgeReadmeError(f"context length {self.context_length} reached; raise "
                                      "--context-length or start a new conversation")
            segs.append(Segment(sl.kv, len(sl.tokens), len(ids), len(toks)))
            ids.extend(toks)
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        if self.miss is not None:
            self.miss.active = len(ids) == len(segs)  # decode only: one new token a sequence
        after_layer = (lambda layer: check()) if check is not None else None
        try:
            if self.router is None:
                logits = self.model(x, segs, 0, after_layer=after_layer)
            else:
                route = torch.cat([self._route(slot, x, s) for (slot, _), s in zip(work, segs)])
                order = self._schedule(route, [s.start + s.length - 1 for s in segs])
                logits = self.model(x, segs, 0, route=route, order=order,
                                    after_layer=after_layer)  # [segments, V]
                self.cache.step += 1  # numbers the forward passes in the cache's access trace
        except BaseException:
            for slot, _ in work:  # keys/values past each sequence's end are partial: ignored
                sl = self.slots[slot]
                sl.routed = min(sl.routed, len(sl.tokens))
            if self.prefetcher is not None:
                self.prefetcher.cancel_pending()
            raise
        for (slot, toks), s in zip(work, segs):
            sl = self.slots[slot]
            sl.tokens.extend(toks)
            if sl.spec_guess is not None and s.length == 1:
                sl.speculations += 1
                sl.speculations_right += int(torch.equal(sl.spec_guess, sl.routes[s.pos]))
            sl.spec_guess = None
        if speculate and len(work) == 1 and self.router is not None and self.options.speculate \
                and not self.all_resident:
            self._speculate(work[0][0], logits[-1])
        return list(logits)

    def _route(self, slot: int, x: torch.Tensor, s: Segment) -> torch.Tensor:
        sl = self.slots[slot]
        if sl.routed != s.pos + s.length:  # not pre-routed: route now with the slot's cache
            part = x[s.start:s.start + s.length]
            sl.routes[s.pos:s.pos + s.length] = self.router.route(part, sl.router_cache,
                                                                  s.pos).cpu()
            sl.routed = s.pos + s.length
        return sl.routes[s.pos:s.pos + s.length]  # [T_s, L]

    def _schedule(self, route: torch.Tensor, last_rows: list[int]) -> list[list[int]]:
        """Per layer, the order of expert groups; tells the cache the future and queues loads.

        Within a layer, resident experts run first (their compute hides the other loads), and the
        experts of each sequence's last token run last, so that they are the freshest when
        decoding continues. The future Belady sees: this step's accesses, then the last tokens'
        paths again (the next tokens most likely keep them; without them, layers just used look
        dead and prefetches of later layers evict them), then the queued work's paths.
        """
        cache = self.cache
        if self.all_resident:  # nothing to plan: every expert stays in its slot
            return [sorted(set(col)) for col in zip(*route.tolist())]  # per layer, no torch op
        nxt = route[last_rows]  # [S, L]
        likely_next = [(layer, e) for layer in range(route.shape[1])
                       for e in dict.fromkeys(nxt[:, layer].tolist())]
        if route.shape[0] == 1:  # one decode token: the path is the future, one expert per layer
            cache.lookahead.clear()
            cache.lookahead.extend(likely_next + likely_next + self._queued_future)
            self.prefetcher.submit(likely_next)
            return [[e] for e in route[0].tolist()]
        order: list[list[int]] = []
        future = []
        for layer in range(route.shape[1]):
            experts = torch.unique(route[:, layer]).tolist()
            last = set(nxt[:, layer].tolist())
            experts.sort(key=lambda e: (e in last, not cache.contains((layer, e))))
            order.append(experts)
            future.extend((layer, e) for e in experts)
        cache.lookahead.clear()
        cache.lookahead.extend(future + likely_next + self._queued_future)
        self.prefetcher.submit(future)
        return order

    def set_queued(self, paths: list[torch.Tensor]) -> None:
        """Router paths of queued requests' prompts: later accesses that Belady may plan for."""
        keys: list[Key] = []
        for route in paths:
            for layer in range(route.shape[1]):
                keys.extend((layer, e) for e in torch.unique(route[:, layer]).tolist())
        self._queued_future = keys

    def set_future(self, keys: list[Key]) -> None:
        """(layer, expert) keys of work queued behind this step, for Belady's lookahead."""
        self._queued_future = keys

    def route_prompt(self, ids: Sequence[int]) -> torch.Tensor | None:
        """The router's path for a whole prompt, from scratch, with a private cache."""
        if self.router is None or not ids:
            return None
        ids = list(ids)[: self.context_length]
        cache = self.router.new_cache(len(ids))
        with torch.inference_mode():
            return self.router.route(torch.tensor(ids, device=self.device), cache, 0).cpu()

    def _speculate(self, slot: int, logits: torch.Tensor) -> None:
        """Route the top-k likely next tokens; prefetch the first layers of the likeliest path.

        The router writes its keys/values at the next position; the real token rewrites them.
        """
        o, sl = self.options, self.slots[slot]
        pos = len(sl.tokens)
        if pos >= self.context_length:
            return
        cands = torch.topk(logits.float(), min(o.speculate, logits.numel())).indices
        with torch.inference_mode():
            paths = [self.router.route(cands[i:i + 1], sl.router_cache, pos).cpu()[0]
                     for i in range(len(cands))]  # each [L]
        sl.spec_guess = paths[0]
        guess = list(enumerate(paths[0].tolist()))
        others = [(0, int(p[0])) for p in paths[1:] if (0, int(p[0])) != guess[0]]
        self.cache.lookahead.clear()  # the likeliest path first, then the runners-up's first layer
        self.cache.lookahead.extend(guess + list(dict.fromkeys(others)) + self._queued_future)
        self.prefetcher.submit(guess[: o.speculate_layers])

    def set_memory_budget(self, budget: int | str) -> MemoryPlan:
        """Re-split a running model at a new budget: the dense part, KV caches and scratch stay
        as they are; the expert slots become what fits beside them (at least one, else a
        BudgetTooSmallError with the minimum). Call it between forward passes. The cache evicts
        by its policy over the future it was told, and a shrink's freed memory goes back to the
        OS before this returns, so a caller that moves bytes from one model to another can
        shrink the first and then grow the second without the sum passing the total."""
        if isinstance(budget, str):
            budget = parse_budget(budget)
            if budget is None:
                raise EdgeReadmeError("memory budget: 'auto' is for loading; give a size")
        check_budget(budget)
        if self.cache is None:
            raise EdgeReadmeError("memory budget: a dense model has no expert slots to resize")
        p = self.plan
        fixed = p.dense_bytes + p.kv_cache_bytes + p.scratch_bytes
        plan = plan_memory(p.dense_bytes, p.slot_bytes, len(self.manifest.entries),
                           p.kv_cache_bytes, p.scratch_bytes, budget, min_slots=1,
                           packed_bytes=p.all_resident_bytes - fixed
                           if self.device.type == "cpu" else None)
        plan = dataclasses.replace(plan, slots=self.cache.resize(plan.slots, plan.packed))
        self.plan = plan
        if plan.slots < len(self.manifest.entries):
            self.all_resident = False  # loads, evictions, prefetch and speculation again
        return plan

    # ------------------------------------------------------------------ reporting

    def resident_bytes(self) -> int:
        """Bytes the runtime holds on the compute device, all allocated at start."""
        total = self.model.weight_bytes() + sum(sl.kv.nbytes for sl in self.slots)
        if self.router is not None:
            total += sum(p.nbytes for p in self.router.parameters())
            total += sum(b.nbytes for b in self.router.buffers())
            total += sum(b.nbytes for sl in self.slots for b in sl.router_cache.buffers())
        if self.cache is not None:
            total += self.cache.block.nbytes
        if self.miss is not None:
            total += self.miss.copies.nbytes
        return total

    def memory_report(self) -> dict:
        d = self.plan.to_json()
        d["resident_bytes"] = self.resident_bytes()
        if self.device.type == "cuda":
            d["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.cache is not None:
            d["peak_expert_bytes"] = self.cache.stats.peak_resident_bytes
        if self.miss is not None:  # --miss-precision: its copies and buffers
            d["miss_copies_bytes"] = self.miss.copies.nbytes
        return d
