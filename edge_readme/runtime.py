"""The runtime under a memory budget: backbone, KV cache, router, expert cache and prefetcher.

`Runtime` turns token ids into logits, one request at a time; it knows nothing about text, threads
or HTTP. For a Read-ME MoE the router gives every token's whole expert path before the backbone
runs, so each step first tells the cache the known future (Belady's lookahead) and queues the loads
(the prefetcher), then computes, waiting only for experts not yet resident.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import quant
from .budget import MemoryPlan, auto_budget, parse_budget, plan_memory
from .config import ModelConfig
from .errors import BudgetError, EdgeReadmeError
from .experts_format import align_up, read_manifest
from .loader import LoadedModel
from .model import KVCache, build_transformer, spec_shape, weight_specs
from .quant import experts as qexperts

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
    if manifest.expert_format == "q4" and fmt in ("q4", "q8") and device.type == "cpu":
        lay = qexperts.Layout(manifest.max_rows, manifest.hidden_size)
        sz_bytes = lay.scale_zero_numel() * quant.act_dtype(fmt, device).itemsize
        return "q4", align_up(lay.nbytes) + align_up(sz_bytes)
    return "float", align_up(3 * manifest.max_rows * manifest.hidden_size * dtype.itemsize)


def context_limit(c: ModelConfig, asked: int) -> int:
    limit = min(asked, c.max_position)
    return min(limit, c.moe.router.max_position) if c.moe is not None else limit


def plan_for(loaded: LoadedModel, manifest, o: RuntimeOptions, device: torch.device,
             dtype: torch.dtype, context_length: int, fmt: str | None = None) -> MemoryPlan:
    """Split the budget: dense weights, KV cache, scratch, then as many expert slots as fit."""
    c, item = loaded.config, dtype.itemsize
    fmt = fmt or pick_format(o, device)[0]
    dense_bytes = 2 * context_length * c.head_dim * item  # rope tables
    for path, name, make, role in weight_specs(c, loaded.tensors, fmt):
        shape = spec_shape(c, loaded.tensors, path, name, fmt)
        if role == "norm":
            dense_bytes += shape[0] * item
        else:
            four = role == "down" and quant.four_bit(fmt, make(), role)
            dense_bytes += quant.planned_nbytes(fmt, shape, role, device, four)
    dense_bytes += sum(t.numel() * 4 for n, t in loaded.tensors.items()
                       if n.startswith("router."))  # the router stays float32
    if c.moe is not None:  # its rope tables and its keys/values for the context
        r = c.moe.router
        dense_bytes += 2 * r.max_position * (r.dim // r.num_heads) * 4
        dense_bytes += 2 * r.num_layers * context_length * r.dim * 4
    kv_item = quant.kv_dtype(fmt, device).itemsize
    kv_bytes = 2 * c.num_layers * c.num_kv_heads * context_length * c.head_dim * kv_item
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
    budget = o.memory_budget
    if isinstance(budget, str):
        budget = parse_budget(budget) if budget != "auto" else None
        if budget is None:
            budget = auto_budget(device)
    if budget is None:  # no cap: everything resident
        budget = dense_bytes + kv_bytes + scratch + keys * slot_bytes
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise BudgetError(f"memory budget: expected a positive byte count, got {budget!r}")
    return plan_memory(dense_bytes, slot_bytes, keys, kv_bytes, scratch, budget, min_slots=1)


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


class Runtime:
    def __init__(self, loaded: LoadedModel, options: RuntimeOptions = RuntimeOptions(),
                 on_progress: Callable[[str, float], None] | None = None):
        self.options = o = options
        self.config: ModelConfig = loaded.config
        if o.threads:
            torch.set_num_threads(o.threads)
        self.device = pick_device(o.device)
        self.weights, self.dtype = pick_format(o, self.device)
        self.context_length = context_limit(self.config, o.context_length)
        if self.context_length < 2:
            raise EdgeReadmeError(f"--context-length: expected >= 2, got {o.context_length}")
        self._stack = contextlib.ExitStack()
        try:
            self._build(loaded, on_progress)
        except BaseException:
            self._stack.close()
            raise
        self.tokens: list[int] = []  # the sequence whose keys/values sit in the KV cache
        self._queued_future: list[Key] = []
        self._spec_guess: torch.Tensor | None = None
        self.routes = torch.zeros(self.context_length, self.config.num_layers, dtype=torch.long)

    # ------------------------------------------------------------------ construction

    def _build(self, loaded: LoadedModel, on_progress) -> None:
        c, o = self.config, self.options
        self.manifest = read_manifest(loaded.path) if c.moe is not None else None
        self.plan = plan_for(loaded, self.manifest, o, self.device, self.dtype,
                             self.context_length, self.weights)
        progress = on_progress or (lambda stage, frac: None)
        progress("weights", 0.0)
        self.model = build_transformer(c, loaded.tensors, self.device, self.dtype,
                                       rope_length=self.context_length, weights=self.weights)
        self.kv = KVCache(c, self.context_length, device=self.device,
                          dtype=quant.kv_dtype(self.weights, self.device))
        self.router = self.router_cache = self.cache = self.prefetcher = None
        self.all_resident = False
        if c.moe is not None:
            self._build_moe(loaded, progress)
        progress("weights", 1.0)

    def _build_moe(self, loaded: LoadedModel, progress) -> None:
        from .cache import ExpertCache, ExpertStore
        from .prefetch import Prefetcher
        from .router import Router

        c, o, m = self.config, self.options, self.manifest
        self.router = Router.from_tensors(c.moe.router, c.moe.num_experts, c.num_layers,
                                          c.moe.routing, loaded.tensors, self.device)
        self.router_cache = self.router.new_cache(self.context_length)
        store = self._stack.enter_context(ExpertStore(m, verify=o.verify, cold=o.cold))
        self.cache = self._stack.enter_context(
            ExpertCache(store, m, self.plan.slots, device=self.device, dtype=self.dtype,
                        policy=o.policy,
                        form=expert_slot(m, self.weights, self.device, self.dtype)[0],
                        kernel_dtype=quant.act_dtype(self.weights, self.device)))
        self.model.attach_experts(self.cache)
        self.prefetcher = self._stack.enter_context(
            Prefetcher(self.cache, enabled=o.prefetch))
        if self.plan.slots >= len(m.entries):
            keys = m.keys()
            for i, key in enumerate(keys):
                with self.cache.get(*key):
                    pass
                progress("experts", (i + 1) / len(keys))
            self.cache.reset_stats()
            # all resident: no loads, evictions, prefetches or speculation from here on
            self.all_resident = self.cache.freeze()

    def close(self) -> None:
        self._stack.close()
        from .memory import release_tensors, trim_heap

        release_tensors(self.model, self.kv, self.router)  # close() gives the memory back
        trim_heap()

    # ------------------------------------------------------------------ the forward steps

    def prefill(self, ids: Sequence[int], stats: StepStats,
                check: Callable[[], None] | None = None) -> torch.Tensor:
        """Make the KV cache hold `ids`, reusing the longest common prefix; logits of the last."""
        if len(ids) > self.context_length:
            raise EdgeReadmeError(f"prompt of {len(ids)} tokens exceeds the context length "
                                  f"{self.context_length}; shorten it or raise --context-length")
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)
        stats.reused_tokens = common
        self.tokens = list(ids[:common])
        self._spec_guess = None
        start = time.perf_counter()
        logits = None
        chunk = max(1, self.options.prefill_chunk)
        for s in range(common, len(ids), chunk):
            part = list(ids[s:s + chunk])
            logits = self._forward(part, s, check)
            self.tokens.extend(part)
        stats.prefill_tokens += len(ids) - common
        stats.prefill_seconds += time.perf_counter() - start
        return logits[-1]

    def decode(self, token: int, stats: StepStats) -> torch.Tensor:
        """Append one token; logits for the next. Scores the last speculation against the truth."""
        if len(self.tokens) >= self.context_length:
            raise EdgeReadmeError(f"context length {self.context_length} reached; raise "
                                  "--context-length or start a new conversation")
        start, pos = time.perf_counter(), len(self.tokens)
        logits = self._forward([token], pos, None)[-1]
        self.tokens.append(token)
        if self._spec_guess is not None:
            stats.speculations += 1
            stats.speculations_right += int(torch.equal(self._spec_guess, self.routes[pos]))
            self._spec_guess = None
        if self.router is not None and self.options.speculate and not self.all_resident:
            self._speculate(logits)
        stats.decode_tokens += 1
        stats.decode_seconds += time.perf_counter() - start
        return logits

    @torch.inference_mode()
    def _forward(self, ids: list[int], pos: int, check) -> torch.Tensor:
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        after_layer = (lambda layer: check()) if check is not None else None
        try:
            if self.router is None:
                return self.model(x, self.kv, pos, after_layer=after_layer)
            route = self.router.route(x, self.router_cache, pos).cpu()  # [T, L]
            self.routes[pos:pos + len(ids)] = route
            order = self._schedule(route)
            logits = self.model(x, self.kv, pos, route=route, order=order,
                                after_layer=after_layer)
            self.cache.step += 1  # numbers the forward passes in the cache's access trace
            return logits
        except BaseException:
            self.tokens = self.tokens[:pos]  # keys/values past pos are partial: forget them
            if self.prefetcher is not None:
                self.prefetcher.cancel_pending()
            raise

    def _schedule(self, route: torch.Tensor) -> list[list[int]]:
        """Per layer, the order of expert groups; tells the cache the future and queues loads.

        Within a layer, resident experts run first (their compute hides the other loads), and the
        last token's expert runs last, so that it is the freshest when decoding continues.
        The future Belady sees: this step's accesses, then the last token's path again (the next
        token most likely keeps it; without it, layers just used look dead and prefetches of
        later layers evict them), then queued requests' prompts.
        """
        cache = self.cache
        last = route[-1].tolist()
        if self.all_resident:  # nothing to plan: every expert stays in its slot
            return [[e] for e in last] if route.shape[0] == 1 else \
                [torch.unique(route[:, layer]).tolist() for layer in range(route.shape[1])]
        likely_next = list(enumerate(last))
        if route.shape[0] == 1:  # decode: the path is the future, one expert per layer
            cache.lookahead.clear()
            cache.lookahead.extend(likely_next + likely_next + self._queued_future)
            self.prefetcher.submit(likely_next)
            return [[e] for e in last]
        order: list[list[int]] = []
        future = []
        for layer in range(route.shape[1]):
            experts = torch.unique(route[:, layer]).tolist()
            experts.sort(key=lambda e: (e == last[layer], not cache.contains((layer, e))))
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

    def route_prompt(self, ids: Sequence[int]) -> torch.Tensor | None:
        """The router's path for a whole prompt, from scratch, with a private cache."""
        if self.router is None or not ids:
            return None
        ids = list(ids)[: self.context_length]
        cache = self.router.new_cache(len(ids))
        with torch.inference_mode():
            return self.router.route(torch.tensor(ids, device=self.device), cache, 0).cpu()

    def _speculate(self, logits: torch.Tensor) -> None:
        """Route the top-k likely next tokens; prefetch the first layers of the likeliest path.

        The router writes its keys/values at the next position; the real token rewrites them.
        """
        o, pos = self.options, len(self.tokens)
        if pos >= self.context_length:
            return
        cands = torch.topk(logits.float(), min(o.speculate, logits.numel())).indices
        with torch.inference_mode():
            paths = [self.router.route(cands[i:i + 1], self.router_cache, pos).cpu()[0]
                     for i in range(len(cands))]  # each [L]
        self._spec_guess = paths[0]
        guess = list(enumerate(paths[0].tolist()))
        others = [(0, int(p[0])) for p in paths[1:] if (0, int(p[0])) != guess[0]]
        self.cache.lookahead.clear()  # the likeliest path first, then the runners-up's first layer
        self.cache.lookahead.extend(guess + list(dict.fromkeys(others)) + self._queued_future)
        self.prefetcher.submit(guess[: o.speculate_layers])

    # ------------------------------------------------------------------ reporting

    def resident_bytes(self) -> int:
        """Bytes the runtime holds on the compute device, all allocated at start."""
        total = self.model.weight_bytes() + self.kv.nbytes
        if self.router is not None:
            total += sum(p.nbytes for p in self.router.parameters())
            total += sum(b.nbytes for b in self.router.buffers())
            total += sum(b.nbytes for b in self.router_cache.buffers())
        if self.cache is not None:
            total += self.cache.block.nbytes
        return total

    def memory_report(self) -> dict:
        d = self.plan.to_json()
        d["resident_bytes"] = self.resident_bytes()
        if self.device.type == "cuda":
            d["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if self.cache is not None:
            d["peak_expert_bytes"] = self.cache.stats.peak_resident_bytes
        return d
