"""ExpertCache: a fixed set of device slots holding experts, filled from an ExpertStore.

All memory is allocated up front: one device block of num_slots slots (each as large as the
largest expert in the compute dtype) and a few host staging buffers (pinned on CUDA). On the CPU
the block's address range is reserved for every expert, but only the first num_slots slots are
ever written, so only they take memory; `resize` moves that line while serving (a shrink evicts
by the policy, compacts, and hands the freed slots' pages back to the OS). The model
calls acquire/release (or `with cache.get(l, e)`); the Prefetcher calls request(). The cache
does not know the model, the router or the thread that calls request(); it only knows slots.

CUDA: copies run on a private copy stream; acquire makes the caller's stream wait on that slot's
event only, and release records an event so a slot is not overwritten while compute still reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from edge_readme.cache.policies import Lookahead, make_policy
from edge_readme.cache.store import ExpertStore, aligned_empty
from edge_readme.errors import BudgetError
from edge_readme.experts_format import ExpertManifest, align_up
from edge_readme.model import ExpertWeights
from edge_readme.quant import experts as qexperts

Key = tuple[int, int]
PAGE = 4096
MADV_DONTNEED = 4  # Linux


def release_pages(lo: int, hi: int) -> bool:
    """Hand the whole pages of [lo, hi) back to the OS (they read as zeros if touched again).
    False where madvise is not there (the memory then stays resident until the block goes)."""
    from edge_readme.memory import _libc

    start, end = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
    libc = _libc()
    madvise = getattr(libc, "madvise", None) if libc is not None else None
    if madvise is None or end <= start:
        return False
    import ctypes

    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(start, end - start, MADV_DONTNEED) == 0


NUM_STAGING = 2  # one for the prefetch thread, one for an on-demand load


def slot_nbytes(manifest: ExpertManifest, form: str, dtype: torch.dtype,
                kernel_dtype: torch.dtype, rows: int | None = None) -> int:
    """Bytes of a slot holding an expert of `rows` rows (None: the largest expert, the size
    of every slot of a cache that evicts). q4: int4 blob, then the kernel's scales and zeros."""
    rows = manifest.max_rows if rows is None else rows
    if form == "q4":
        lay = qexperts.Layout(rows, manifest.hidden_size)
        return align_up(lay.nbytes) + align_up(lay.scale_zero_numel() * kernel_dtype.itemsize)
    return align_up(3 * rows * manifest.hidden_size * dtype.itemsize)


def packed_nbytes(manifest: ExpertManifest, form: str, dtype: torch.dtype,
                  kernel_dtype: torch.dtype) -> int:
    """Bytes of every expert resident, each in a slot of its own size (a packed cache)."""
    return sum(slot_nbytes(manifest, form, dtype, kernel_dtype, manifest.entry(*k).rows)
               for k in manifest.keys())


@dataclasses.dataclass
class CacheStats:
    """Counters since the last reset_stats(). An acquire that finds its expert resident, or in
    flight, is a hit (inflight_waits counts the latter); stall_seconds is time acquire() blocked."""

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetch_issued: int = 0
    prefetch_wasted: int = 0
    inflight_waits: int = 0
    bytes_read: int = 0
    stall_seconds: float = 0.0
    loads: int = 0
    evictions: int = 0
    peak_resident_bytes: int = 0
    low_precision: int = 0  # uses served by a low-bit copy (--miss-precision) instead of a load

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def low_precision_rate(self) -> float:
        """Low-bit uses / all expert uses (hits, misses and low-bit uses)."""
        total = self.hits + self.misses + self.low_precision
        return self.low_precision / total if total else 0.0

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "hit_ratio": self.hit_ratio,
                "low_precision_rate": self.low_precision_rate}


@dataclasses.dataclass
class _Staging:
    host: torch.Tensor  # uint8, 4096-aligned, pinned on CUDA
    device: torch.Tensor | None  # file-dtype buffer on the device when a cast is needed there
    event: object | None  # CUDA: the last copy out of `host`


class ExpertCache:
    """Experts in num_slots preallocated slots; evicts by `policy` among unpinned experts."""

    def __init__(
        self,
        store: ExpertStore,
        manifest: ExpertManifest,
        num_slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        policy: str = "lru",
        form: str = "float",
        kernel_dtype: torch.dtype = torch.float32,
        packed: bool = False,
    ):
        if num_slots < 1:
            raise BudgetError(
                f"expert cache: expected at least 1 expert slot, found {num_slots}; "
                "raise --memory-budget"
            )
        self.store, self.manifest = store, manifest
        self.device, self.dtype = torch.device(device), dtype
        if form == "q4" and (manifest.expert_format != "q4" or self.device.type != "cpu"):
            raise ValueError("q4 slots hold q4 experts on the CPU only")
        self.form = form  # "q4": int4 blobs + kernel scales; "float": [3, rows, D] in dtype
        self.kernel_dtype = kernel_dtype  # q4: the int4 kernel's scale and activation dtype
        self.policy_name = policy
        self._policy = make_policy(policy)
        self.lookahead = Lookahead()
        self.stats = CacheStats()
        self.step = 0  # the forward pass being served; the runtime advances it
        self.trace: list[tuple[int, int, int]] | None = None  # a list: record (step, layer, expert)
        self.num_slots = min(num_slots, len(manifest.entries))
        if packed and (self.device.type != "cpu" or self.num_slots < len(manifest.entries)):
            raise ValueError("a packed cache holds every expert, on the CPU")
        # CPU: address space for every expert, untouched (so not resident) past num_slots
        self._capacity = len(manifest.entries) if self.device.type == "cpu" else self.num_slots
        self._cond = threading.Condition()
        self._init_state()
        self._allocate()
        self._set_layout(packed)

    def _init_state(self) -> None:
        self._slot_key: list[Key | None] = [None] * self.num_slots
        self._key_slot: dict[Key, int] = {}
        self._loading: set[Key] = set()
        self._pins: dict[Key, int] = {}
        self._unused_prefetch: set[Key] = set()
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self._weights: list[ExpertWeights | None] = [None] * self.num_slots
        self._resident_bytes = 0
        self._frozen: dict[Key, ExpertWeights] | None = None

    # ---- allocation (the only place that allocates) ------------------------------------------

    def _allocate(self) -> None:
        m, cuda = self.manifest, self.device.type == "cuda"
        if self.form == "q4":
            lay = qexperts.Layout(m.max_rows, m.hidden_size)
            self._sz_offset = align_up(lay.nbytes)  # kernel scales sit after the blob
            sz_bytes = lay.scale_zero_numel() * self.kernel_dtype.itemsize
            self.slot_bytes = self._sz_offset + align_up(sz_bytes)
            self._block_bytes = aligned_empty(self._capacity * self.slot_bytes)
            self._slots = self._block_bytes.view(self._capacity, self.slot_bytes)
        else:
            self.slot_bytes = align_up(3 * m.max_rows * m.hidden_size * self.dtype.itemsize)
            slot_elems = self.slot_bytes // self.dtype.itemsize
            if self.device.type == "cpu":
                self._block_bytes = aligned_empty(self._capacity * self.slot_bytes)
                self._slots = self._block_bytes.view(self.dtype).view(self._capacity, slot_elems)
            else:
                self._block_bytes = None
                self._slots = torch.empty(
                    self.num_slots, slot_elems, dtype=self.dtype, device=self.device
                )
        self._direct = self.device.type == "cpu" and (
            self.form == "q4" or (m.expert_format == "float" and m.dtype == self.dtype))
        self._staging: queue.Queue[_Staging] = queue.Queue()
        if not self._direct:
            for _ in range(NUM_STAGING):
                self._staging.put(self._new_staging(cuda))
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        events = range(self.num_slots) if cuda else ()
        self._ready_events = [torch.cuda.Event() for _ in events]
        self._free_events = [torch.cuda.Event() for _ in events]

    def _set_layout(self, packed: bool) -> None:
        """Uniform: slot i at i x slot_bytes. Packed (every expert resident, CPU): each expert
        has its own slot of its own size, one after another, in manifest order."""
        self._packed: list[tuple[int, int, int]] | None = None  # (offset, bytes, scales at)
        self._home: dict[Key, int] | None = None
        self.packed_bytes = 0
        if not packed:
            return
        m, off = self.manifest, 0
        self._packed, self._home = [], {}
        for i, key in enumerate(m.keys()):
            rows = m.entry(*key).rows
            size = slot_nbytes(m, self.form, self.dtype, self.kernel_dtype, rows)
            sz_at = align_up(qexperts.Layout(rows, m.hidden_size).nbytes) \
                if self.form == "q4" else 0
            self._packed.append((off, size, sz_at))
            self._home[key] = i
            off += size
        self.packed_bytes = off

    def _slot(self, slot: int) -> torch.Tensor:
        """The slot's memory, 1-D: bytes for q4, else elements of the compute dtype."""
        if self._packed is None:
            return self._slots[slot]
        off, size, _ = self._packed[slot]
        raw = self._block_bytes[off:off + size]
        return raw if self.form == "q4" else raw.view(self.dtype)

    def _slot_raw(self, slot: int) -> torch.Tensor:
        """The slot's bytes (CPU)."""
        if self._packed is None:
            lo = slot * self.slot_bytes
            return self._block_bytes[lo:lo + self.slot_bytes]
        off, size, _ = self._packed[slot]
        return self._block_bytes[off:off + size]

    def _new_staging(self, cuda: bool) -> _Staging:
        m = self.manifest
        host = aligned_empty(ExpertStore.buffer_bytes(m), pin_memory=cuda)
        device = None
        if self.device.type != "cpu" and (m.dtype != self.dtype or m.expert_format == "q4"):
            device = torch.empty(m.max_length, dtype=torch.uint8, device=self.device)
        return _Staging(host, device, torch.cuda.Event() if cuda else None)

    @property
    def block(self) -> torch.Tensor:
        """The slot block in use, [num_slots, slot_bytes / itemsize] in the compute dtype
        (packed: the bytes of every expert's own slot, one after another)."""
        if self._packed is not None:
            return self._block_bytes[:self.packed_bytes]
        return self._slots[:self.num_slots]

    def resize(self, num_slots: int, packed: bool = False) -> int:
        """Hold `num_slots` slots from now on (at least 1, at most one per expert); returns the
        count. Call it between forward passes (no expert pinned). A shrink evicts by the cache's
        policy over the future it was told (Belady: the experts used last go first), moves the
        experts left above the line into free slots below it, and returns the freed slots' pages
        to the OS (madvise). A grow takes slots from the reserved range. packed (with a slot
        per expert): each expert in a slot of its own size; a change of layout evicts every
        expert and returns all their pages first, and the experts load again on use. CPU only."""
        if self.device.type != "cpu":
            raise BudgetError(f"expert cache: resizing works on the CPU only; on "
                              f"{self.device.type} the slot split is fixed at load")
        n = max(1, min(int(num_slots), len(self.manifest.entries)))
        packed = packed and n == len(self.manifest.entries)
        with self._cond:
            while self._loading:  # a prefetch is filling a slot: let it land first
                self._cond.wait()
            if self._pins:
                raise BudgetError("expert cache: resize while experts are in use; call it "
                                  "between forward passes")
            self._frozen = None
            if packed != (self._packed is not None):  # a new layout: start it empty
                for key in list(self._key_slot):
                    self._evict(key)
                used = self.packed_bytes if self._packed is not None \
                    else self.num_slots * self.slot_bytes
                base = self._block_bytes.data_ptr()
                release_pages(base, base + used)
                self.num_slots = n
                self._init_state()
                self._set_layout(packed)
                self._cond.notify_all()
                return n
            while len(self._key_slot) > n:
                victim = self._policy.victim(list(self._key_slot), self.lookahead)
                self._free.append(self._evict(victim))
            grow = max(0, n - self.num_slots)
            self._slot_key += [None] * grow
            self._weights += [None] * grow
            below = [i for i in range(n) if self._slot_key[i] is None]
            for old in range(n, self.num_slots):  # compact: residents above the line move down
                key = self._slot_key[old]
                if key is None:
                    continue
                new = below.pop()
                self._slot(new).copy_(self._slot(old))
                self._slot_key[new], self._slot_key[old] = key, None
                self._key_slot[key] = new
                self._weights[new], self._weights[old] = self._views(key, new), None
            if n < self.num_slots:
                lo = self._block_bytes.data_ptr() + n * self.slot_bytes
                release_pages(lo, self._block_bytes.data_ptr() + self.num_slots * self.slot_bytes)
                del self._slot_key[n:], self._weights[n:]
            self.num_slots = n
            self._free = [i for i in range(n - 1, -1, -1) if self._slot_key[i] is None]
            self._cond.notify_all()
        return n

    # ---- the model's side ---------------------------------------------------------------------

    def acquire(self, layer: int, expert: int) -> ExpertWeights:
        """Block until (layer, expert) is resident, pin it, and return views of its weights."""
        key, start = (layer, expert), time.perf_counter()
        if self.trace is not None:
            self.trace.append((self.step, layer, expert))
        self.lookahead.advance(key)  # this access is no longer future: Belady ranks what follows
        with self._cond:
            waited = False
            while True:
                waited |= self._wait_in_flight(key)
                slot = self._key_slot.get(key)
                load = slot is None
                if not load:
                    self._count_hit(key, waited)
                    break
                slot = self._claim(key, prefetch=False)
                if slot is not None:
                    self.stats.misses += 1
                    break
                self._cond.wait()  # every evictable slot is being filled; retry when one lands
            self._pins[key] = self._pins.get(key, 0) + 1
        if load:
            self._load(key, slot, prefetch=False)
        if self._ready_events:
            torch.cuda.current_stream(self.device).wait_event(self._ready_events[slot])
        if load or waited:
            with self._cond:
                self.stats.stall_seconds += time.perf_counter() - start
        return self._weights[slot]

    def release(self, layer: int, expert: int) -> None:
        key = (layer, expert)
        with self._cond:
            pins = self._pins.get(key, 0)
            if pins < 1:
                raise ValueError(f"release({layer}, {expert}): the expert is not acquired")
            if pins == 1:
                del self._pins[key]
            else:
                self._pins[key] = pins - 1
            if self._free_events:
                self._free_events[self._key_slot[key]].record(
                    torch.cuda.current_stream(self.device)
                )

    def get(self, layer: int, expert: int) -> contextlib.AbstractContextManager[ExpertWeights]:
        """`with cache.get(l, e) as w:` the expert, resident (and pinned) inside the block."""
        frozen = self._frozen
        if frozen is not None:  # every expert resident for good: no lock, pin or policy
            self.stats.hits += 1
            if self.trace is not None:
                self.trace.append((self.step, layer, expert))
            return contextlib.nullcontext(frozen[(layer, expert)])
        return self._pinned(layer, expert)

    @contextlib.contextmanager
    def _pinned(self, layer: int, expert: int) -> Iterator[ExpertWeights]:
        weights = self.acquire(layer, expert)
        try:
            yield weights
        finally:
            self.release(layer, expert)

    def try_get(self, layer: int, expert: int
                ) -> contextlib.AbstractContextManager[ExpertWeights] | None:
        """get() if the expert is resident now, else None at once (no wait, no load): the
        caller serves this use another way (a low-bit copy) and counts it with low_precision."""
        if self._frozen is not None:
            return self.get(layer, expert)
        key = (layer, expert)
        if self.trace is not None:
            self.trace.append((self.step, layer, expert))
        self.lookahead.advance(key)
        with self._cond:
            slot = self._key_slot.get(key)
            if slot is None or key in self._loading:
                self.stats.low_precision += 1
                return None
            self._count_hit(key, False)
            self._pins[key] = self._pins.get(key, 0) + 1
        if self._ready_events:
            torch.cuda.current_stream(self.device).wait_event(self._ready_events[slot])
        return self._held(key, self._weights[slot])

    @contextlib.contextmanager
    def _held(self, key: Key, weights: ExpertWeights) -> Iterator[ExpertWeights]:
        try:
            yield weights
        finally:
            self.release(*key)

    def freeze(self) -> bool:
        """Once every expert is resident (a slot each), serve them without bookkeeping: nothing
        can be evicted any more. Returns whether the cache is frozen."""
        with self._cond:
            keys = self.manifest.keys()
            if self._loading or any(k not in self._key_slot for k in keys):
                return False
            self._frozen = {k: self._weights[self._key_slot[k]] for k in keys}
            return True

    # ---- the prefetcher's side ----------------------------------------------------------------

    def contains(self, key: Key) -> bool:
        """Resident or in flight."""
        with self._cond:
            return key in self._key_slot

    def request(self, keys: Iterable[Key]) -> int:
        """Load keys ahead of use, in order; return how many loads were issued.

        Never evicts a pinned expert, nor one whose next use (per lookahead) is sooner than the
        requested key's; a key that cannot get a slot under those rules is skipped.
        """
        issued = 0
        for key in keys:
            with self._cond:
                if key in self._key_slot:
                    continue
                slot = self._claim(key, prefetch=True)
                if slot is None:
                    continue
                self.stats.prefetch_issued += 1
            issued += 1
            self._load(key, slot, prefetch=True)
        return issued

    def preload_all(self) -> None:
        """Load every expert (needs a slot per expert); no evictions happen afterwards."""
        keys = self.manifest.keys()
        if self.num_slots < len(keys):
            raise BudgetError(
                f"preload_all: {len(keys)} experts need {len(keys)} slots, the cache has "
                f"{self.num_slots}; raise --memory-budget or stream experts instead"
            )
        for key in keys:
            with self._cond:
                if key in self._key_slot:
                    continue
                slot = self._claim(key, prefetch=False)
            self._load(key, slot, prefetch=False)

    def reset_stats(self) -> None:
        with self._cond:
            self.stats = CacheStats(peak_resident_bytes=self._resident_bytes)

    def resident(self) -> list[Key]:
        with self._cond:
            return [k for k in self._key_slot if k not in self._loading]

    # ---- slot bookkeeping (callers hold self._cond) -------------------------------------------

    def _wait_in_flight(self, key: Key) -> bool:
        waited = False
        while key in self._loading:
            waited = True
            self._cond.wait()
        return waited

    def _count_hit(self, key: Key, waited: bool) -> None:
        self.stats.hits += 1
        self.stats.inflight_waits += waited
        if key in self._unused_prefetch:
            self._unused_prefetch.discard(key)
            self.stats.prefetch_hits += 1
        self._policy.on_hit(key)

    def _claim(self, key: Key, prefetch: bool) -> int | None:
        """A slot for key (evicting if needed), marked loading; None if a prefetch may not evict."""
        if self._home is not None:  # packed: every expert has its own slot
            slot = self._home[key]
            self._free.remove(slot)
        elif self._free:
            slot = self._free.pop()
        else:
            victim = self._pick_victim(key, prefetch)
            if victim is None:
                return None
            slot = self._evict(victim)
        self._slot_key[slot] = key
        self._key_slot[key] = slot
        self._loading.add(key)
        self._policy.on_insert(key)
        return slot

    def _pick_victim(self, key: Key, prefetch: bool) -> Key | None:
        pins, loading = self._pins, self._loading
        candidates = [k for k in self._key_slot if k not in pins and k not in loading]
        if not prefetch and not candidates and any(k not in pins for k in loading):
            return None  # a prefetch is filling the only free slots: acquire waits for it
        if prefetch:
            need = self.lookahead.next_use(key)
            candidates = [k for k in candidates if self.lookahead.next_use(k) >= need]
            if not candidates:
                return None
        elif not candidates:
            raise BudgetError(
                f"expert cache: all {self.num_slots} slots hold pinned or loading experts, none "
                f"free for layer {key[0]} expert {key[1]}; release experts after use or raise "
                "--memory-budget"
            )
        return self._policy.victim(candidates, self.lookahead)

    def _evict(self, victim: Key) -> int:
        slot = self._forget(victim)
        self.stats.evictions += 1
        if victim in self._unused_prefetch:
            self._unused_prefetch.discard(victim)
            self.stats.prefetch_wasted += 1
        self._resident_bytes -= self._expert_bytes(victim)
        return slot

    def _forget(self, key: Key) -> int:
        slot = self._key_slot.pop(key)
        self._slot_key[slot] = None
        self._weights[slot] = None
        self._policy.on_evict(key)
        return slot

    def _expert_bytes(self, key: Key) -> int:
        rows = self.manifest.entry(*key).rows
        if self.form == "q4":
            lay = qexperts.Layout(rows, self.manifest.hidden_size)
            return lay.nbytes + lay.scale_zero_numel() * self.kernel_dtype.itemsize
        return 3 * rows * self.manifest.hidden_size * self.dtype.itemsize

    # ---- loading (no lock held during I/O) ----------------------------------------------------

    def _load(self, key: Key, slot: int, prefetch: bool) -> None:
        try:
            nbytes = self._fill(key, slot)
        except BaseException:
            with self._cond:
                self._loading.discard(key)
                self._pins.pop(key, None)
                self._free.append(self._forget(key))
                self._cond.notify_all()
            raise
        weights = self._views(key, slot)
        with self._cond:
            self._loading.discard(key)
            self._weights[slot] = weights
            self.stats.loads += 1
            self.stats.bytes_read += nbytes
            self._resident_bytes += self._expert_bytes(key)
            peak = max(self.stats.peak_resident_bytes, self._resident_bytes)
            self.stats.peak_resident_bytes = peak
            if prefetch:
                self._unused_prefetch.add(key)
            self._cond.notify_all()

    def _views(self, key: Key, slot: int) -> ExpertWeights:
        """Weights over the slot's memory, valid until the expert is evicted."""
        rows, hidden = self.manifest.entry(*key).rows, self.manifest.hidden_size
        if self.form == "q4":
            lay = qexperts.Layout(rows, hidden)
            mem = self._slot(slot)
            views = lay.views(mem[: lay.nbytes])
            sz_at = self._sz_offset if self._packed is None else self._packed[slot][2]
            sz = mem[sz_at:].view(self.kernel_dtype)
            gate_up, down = qexperts.weights(views, qexperts.scale_zero_into(views, sz))
            return ExpertWeights(gate_up=gate_up, down=down)
        w = self._slot(slot)[: 3 * rows * hidden].view(3, rows, hidden)  # [3, rows, D]
        return ExpertWeights(gate_up=w[:2].view(2 * rows, hidden), down=w[2].t())

    def _fill(self, key: Key, slot: int) -> int:
        """Read the expert's bytes into the slot; return bytes read from the file."""
        if self._direct:
            return self.store.read_into(*key, self._slot_raw(slot))
        staging = self._staging.get()
        try:
            if staging.event is not None:
                staging.event.synchronize()  # the previous copy out of this buffer is done
            nbytes = self.store.read_into(*key, staging.host)
            self._copy(staging, nbytes, slot)
            return nbytes
        finally:
            self._staging.put(staging)

    def _copy(self, staging: _Staging, nbytes: int, slot: int) -> None:
        if self._copy_stream is None:
            self._cast_copy(staging, nbytes, slot, non_blocking=False)
            return
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._free_events[slot])
            self._cast_copy(staging, nbytes, slot, non_blocking=True)
            self._ready_events[slot].record(self._copy_stream)
            staging.event.record(self._copy_stream)

    def _cast_copy(self, staging: _Staging, nbytes: int, slot: int, non_blocking: bool) -> None:
        """File bytes in staging.host -> the slot in the compute dtype (q4 files dequantized)."""
        m, src = self.manifest, staging.host[:nbytes]
        if staging.device is not None:  # to the device first; cast or dequantize there
            tmp = staging.device[:nbytes]
            tmp.copy_(src, non_blocking=non_blocking)
            src = tmp
        if m.expert_format == "q4":
            rows = qexperts.Layout.rows_of(nbytes, m.hidden_size)
            gate_up, down = qexperts.dequantize(qexperts.Layout(rows, m.hidden_size).views(src))
            dst = self._slot(slot)[: 3 * rows * m.hidden_size].view(3, rows, m.hidden_size)
            dst[:2].view(2 * rows, m.hidden_size).copy_(gate_up)
            dst[2].copy_(down.t())
            return
        src = src.view(m.dtype)  # [3 * rows * D], file dtype
        self._slot(slot)[: src.numel()].copy_(src, non_blocking=non_blocking)

    # ---- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for pending copies and drop the slot block and staging buffers."""
        if getattr(self, "_copy_stream", None) is not None:
            self._copy_stream.synchronize()
        self._slots = self._block_bytes = None
        self._staging = queue.Queue()

    def __enter__(self) -> ExpertCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
