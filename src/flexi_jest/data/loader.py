"""The training stream: shards drawn into a fixed number of streams, each rank decoding only its share.

A dataset (a spec, specs.py) is read as `streams` independent, deterministic streams of samples. Stream s
makes its k-th *visit* to shard `shard_of(k * streams + s)`:

  - mode "resampled" (the pool's default, as open_clip's --dataset-resampled): shards drawn with replacement,
    no epochs; a pool may be far larger than any run. A shard whose sample count (manifest or img2dataset's
    `*_stats.json`, specs.py) is 0 has zero weight: img2dataset's last shard is often empty (every URL of it
    failed), and drawing it again and again would only cost reads;
  - mode "epoch" (curated data): global visit g reads the shard at position g % n of epoch g // n's
    permutation, so every epoch reads every shard once.

A visit yields the shard's samples in an order drawn from (seed, visit). A batch of B samples takes B / streams
consecutive usable samples from every stream, in stream order; rank r of `world` holds the rows
shard(B, world), which are whole streams (streams / world of them): it reads and decodes those streams only,
so each sample is decoded once, on one rank, and the batch is the same for any world size that divides
`streams` (when `streams` does not divide B, a rank's streams share its B / world rows as evenly as they go,
and the batch depends on the world size). The state is each stream's (visit, offset); a resumed stream
re-reads its current shard, skips `offset` raw samples without decoding them and continues exactly where it stopped.

Liveness: a stream fails (UnreadableSplitError, with the read stats) once every shard it may draw has been read
whole, empty or without one usable sample, since its last usable sample. The rule counts distinct shards, not
visits: drawing with replacement, n visits need not cover n shards, and a pool with one empty shard of unknown
count would otherwise fail by chance.

Decoding runs in `workers` processes (0: in the caller): the reading thread hands groups of raw samples to the
pool in stream order and takes the results back in the same order, so parallel decoding changes nothing in
the stream. Images come back uint8 [3, S, S] (transforms.py); nothing here touches a device.
"""

import multiprocessing
import queue
import random
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

from flexi_jest.data.shards import ReadStats, UnreadableSplitError, decode_sample, iter_tar
from flexi_jest.data.specs import DatasetSpec, resolve
from flexi_jest.data.transforms import ImageTransform

Mode = Literal["resampled", "epoch"]
Attach = Callable[[str, Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]  # (shard url, raws) -> raws
GROUP = 16  # raw samples per decoding task
LOOKAHEAD_GROUPS = 4  # decoding tasks in flight per worker


def _seeded(*parts: int) -> random.Random:
    """A Random seeded by the parts (a string seed: the same in every process and Python run)."""
    return random.Random("/".join(str(p) for p in parts))


def shard_of(visit: int, num_shards: int, mode: Mode, seed: int, live: Sequence[int] | None = None) -> int:
    """The shard index of global visit `visit`: resampled (with replacement) or epoch-wise permuted.

    live: the shard indices resampling draws from, uniformly (default: all; the loader leaves out the shards known
    to be empty); with every shard live the draws are those of range(num_shards). Epoch mode visits every shard."""
    if mode == "resampled":
        choices = range(num_shards) if live is None else live
        return choices[_seeded(seed, 1, visit).randrange(len(choices))]
    epoch, position = divmod(visit, num_shards)
    order = list(range(num_shards))
    _seeded(seed, 2, epoch).shuffle(order)
    return order[position]


def _decode_group(raws: list[dict[str, Any]], image_size: int | None, transform: ImageTransform | None
                  ) -> tuple[list[dict[str, Any] | None], ReadStats]:
    """Decode a group of raw samples (in a worker process); None for an unusable one, counted in the stats."""
    stats = ReadStats()
    return [decode_sample(raw, image_size, stats, transform) for raw in raws], stats


def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)


def merge_stats(into: ReadStats, other: ReadStats) -> None:
    """Add a decoding task's skips to the stream's stats (its samples count when handed on: next_batch)."""
    into.skipped.update(other.skipped)
    into.errors += other.errors[: max(0, 20 - len(into.errors))]


@dataclass
class _Lane:
    """One stream being read: its position and the decoding tasks in flight, in order."""

    stream: int
    visit: int  # visits started (the current one included); 0 before the first
    offset: int  # raw samples of the current visit consumed
    raws: Iterator[tuple[dict[str, Any], tuple]] | None = None  # (raw, its position: see _raw_iter)
    pending: deque | None = None  # of (Future | decoded, [(key, *position) of each raw], extras)
    ready: deque | None = None  # (sample | None, key, *position) decoded, not yet consumed
    usable: bool = False  # a usable sample in the current visit
    bad_shards: set | None = None  # shards read whole (or empty), without a usable sample, since the last usable one


class StreamLoader:
    """Batches of decoded samples from a dataset spec: this rank's rows of each batch, resumable (module docstring).

    spec: a dataset spec or a resolved DatasetSpec; batch_size: the global batch B (divisible by streams);
    streams: fixed for a run (the checkpointed state belongs to it; world sizes must divide it);
    image_size / transform: the host preprocessing (default: resize + centre crop to image_size);
    attach(shard_url, raws): joins data onto raw samples as a shard is read (the reference cache);
    rank, world: which rows this process holds; max_consecutive_bad: unusable samples in a row that fail the stream
    (0: no limit; a stream that reads every shard whole without a usable sample fails regardless).
    """

    def __init__(self, spec: str | DatasetSpec, batch_size: int, *, streams: int = 8, mode: Mode = "resampled",
                 seed: int = 0, image_size: int | None = None, transform: ImageTransform | None = None,
                 workers: int = 0, attach: Attach | None = None, rank: int = 0, world: int = 1,
                 max_consecutive_bad: int = 10_000):
        self.spec = spec if isinstance(spec, DatasetSpec) else resolve(spec)
        self.live = [i for i, shard in enumerate(self.spec.shards) if shard.num_samples != 0]  # count 0: never drawn
        if not self.live:
            raise UnreadableSplitError(f"every shard of {self.spec.spec!r} is empty by its sample counts (manifest or "
                                       f"*_stats.json): {', '.join(s.name for s in self.spec.shards[:5])}")
        if streams % world:
            raise ValueError(f"data streams ({streams}) must be divisible by the number of processes ({world})")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes ({world})")
        if mode not in ("resampled", "epoch"):
            raise ValueError(f"mode must be 'resampled' or 'epoch', got {mode!r}")
        self.batch_size, self.streams, self.mode, self.seed = batch_size, streams, mode, seed
        self.image_size, self.transform, self.workers, self.attach = image_size, transform, workers, attach
        per_rank = streams // world
        self.my_streams = range(rank * per_rank, (rank + 1) * per_rank)
        share = batch_size // world  # this rank's rows, split over its streams as evenly as they go
        self.take = {s: share // per_rank + (i < share % per_rank) for i, s in enumerate(self.my_streams)}
        self.max_consecutive_bad = max_consecutive_bad
        self.stats = ReadStats()
        self.decoded = 0  # raw samples this process decoded (or tried to)
        self._consecutive_bad = 0
        self._epoch_keys: dict[int, set[str]] = {}
        self._positions = {s: (0, 0) for s in range(streams)}
        self._pool: ProcessPoolExecutor | None = None
        self._lanes: dict[int, _Lane] = {}

    # ---- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every stream's (visit, offset) after the last batch returned (this rank's streams advance; gather the
        ranks' states with merge_states for a checkpoint)."""
        return {"format": "flexi-jest-stream/1", "mode": self.mode, "seed": self.seed, "streams": self.streams,
                "positions": [list(self._positions[s]) for s in range(self.streams)],
                "mine": list(self.my_streams)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "flexi-jest-stream/1":
            raise ValueError("the checkpoint's data state is not a flexi-jest-stream/1 state (written by an older "
                             "version of the reader): start the run afresh (resume: false)")
        for key in ("mode", "seed", "streams"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint's data stream has {key}={state[key]!r}, this run {getattr(self, key)!r}; "
                                 f"resume with the same {key}")
        self._positions = {s: tuple(p) for s, p in enumerate(state["positions"])}
        self._lanes, self._consecutive_bad = {}, 0

    # ---- reading ----------------------------------------------------------------------------------------------

    def _global_visit(self, stream: int, visit: int) -> int:
        return (visit - 1) * self.streams + stream

    def _visit_shard(self, stream: int, visit: int) -> int:
        return shard_of(self._global_visit(stream, visit), len(self.spec.shards), self.mode, self.seed,
                        self.live if len(self.live) < len(self.spec.shards) else None)

    @property
    def drawable(self) -> int:
        """Shards a stream may visit: the live ones when resampling, every one in epoch mode."""
        return len(self.live) if self.mode == "resampled" else len(self.spec.shards)

    def _visit_raws(self, stream: int, visit: int) -> list[dict[str, Any]]:
        """Raw samples of stream's visit-th visit (1-based), in the visit's order."""
        global_visit = self._global_visit(stream, visit)
        shard = self.spec.shards[self._visit_shard(stream, visit)]
        raws: Iterable[dict[str, Any]] = iter_tar(shard, self.stats)
        if self.attach is not None:
            raws = self.attach(shard.url, raws)
        raws = list(raws)
        _seeded(self.seed, 3, global_visit).shuffle(raws)
        return raws

    def _raw_iter(self, stream: int, visit: int, offset: int, bad_shards: set
                  ) -> Iterator[tuple[dict[str, Any], tuple]]:
        """(raw, (visit, offset after it, last of its visit, whole visit read)) from the stream's position on.

        bad_shards: the lane's shards read without a usable sample (next_batch adds those with bad samples); an
        empty visit adds its shard here, and the stream fails when the set holds every shard it may draw."""
        if visit == 0:
            visit, offset = 1, 0
        while True:
            raws = self._visit_raws(stream, visit)
            for i in range(offset, len(raws)):
                yield raws[i], (visit, i + 1, i + 1 == len(raws), offset == 0)
            if not raws:
                bad_shards.add(self._visit_shard(stream, visit))
                if len(bad_shards) >= self.drawable:
                    self._unreadable(f"no usable sample in a whole pass over {self.spec.spec!r} (each of its "
                                     f"{self.drawable} shards read whole, the last of them empty)")
            visit, offset = visit + 1, 0

    def _unreadable(self, what: str) -> None:
        raise UnreadableSplitError(f"{what}: {self.stats.summary()}; first problems: {self.stats.errors[:5]}")

    def _submit(self, lane: _Lane) -> None:
        """Hand the lane's next group of raw samples (never across a visit's end) to the decoders."""
        group = []
        while len(group) < GROUP:
            group.append(next(lane.raws))
            if group[-1][1][2]:  # the visit's last sample
                break
        raws = [raw for raw, _ in group]
        positions = [(raw["__key__"], *position) for raw, position in group]
        if self._pool is None:
            lane.pending.append((_decode_group(raws, self.image_size, self.transform), positions, None))
        else:  # the reference embeddings stay here; the workers get the bytes
            extras = [{k: raw.pop(k) for k in ("ref_image_emb", "ref_text_emb") if k in raw} for raw in raws]
            future = self._pool.submit(_decode_group, raws, self.image_size, self.transform)
            lane.pending.append((future, positions, extras))

    def _next_decoded(self, lane: _Lane) -> tuple:
        """(sample or None, key, visit, offset after, last of its visit, whole visit) of the lane's next raw sample."""
        if not lane.ready:
            in_flight = 1 if self._pool is None else LOOKAHEAD_GROUPS * self.workers // len(self.my_streams) + 1
            while len(lane.pending) < in_flight:
                self._submit(lane)
            result, positions, extras = lane.pending.popleft()
            samples, stats = result.result() if isinstance(result, Future) else result
            for sample, extra in zip(samples, extras or []):
                if sample is not None:
                    sample.update(extra)
            merge_stats(self.stats, stats)
            self.decoded += len(samples)
            lane.ready.extend((sample, *position) for sample, position in zip(samples, positions))
        return lane.ready.popleft()

    def _lane(self, stream: int) -> _Lane:
        if stream not in self._lanes:
            visit, offset = self._positions[stream]
            lane = _Lane(stream, visit, offset, None, deque(), deque(), bad_shards=set())
            lane.raws = self._raw_iter(stream, visit, offset, lane.bad_shards)  # shares the lane's set
            self._lanes[stream] = lane
        return self._lanes[stream]

    def _note_key(self, key: str, stream: int, visit: int) -> None:
        """Duplicate keys within an epoch (epoch mode; resampling repeats samples by design), on this process."""
        if self.mode != "epoch":
            return
        epoch = self._global_visit(stream, visit) // len(self.spec.shards)
        if epoch not in self._epoch_keys:  # streams run a little apart: keep the previous epoch's keys too
            self._epoch_keys = {e: keys for e, keys in self._epoch_keys.items() if e >= epoch - 1}
            self._epoch_keys[epoch] = set()
        seen = self._epoch_keys[epoch]
        if key in seen:
            self.stats.duplicate_keys += 1
            if len(self.stats.errors) < 20:
                self.stats.errors.append(f"duplicate_key: {key} again in epoch {epoch} of {self.spec.spec!r}")
        else:
            seen.add(key)

    def next_batch(self) -> list[dict[str, Any]]:
        """This rank's rows of the next batch: batch_size / world decoded samples, streams in order.

        Raises UnreadableSplitError (with the read stats) after max_consecutive_bad unusable samples in a row, or
        when a stream has read every shard whole without one usable sample."""
        if self.workers and self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_worker_init)
        batch: list[dict[str, Any]] = []
        for stream in self.my_streams:
            lane = self._lane(stream)
            taken = 0
            while taken < self.take[stream]:
                sample, key, visit, offset, last, whole = self._next_decoded(lane)
                self._positions[stream] = (visit, offset)
                self._note_key(key, stream, visit)
                if sample is not None:
                    batch.append(sample)
                    taken += 1
                    self.stats.samples += 1
                    self._consecutive_bad, lane.usable = 0, True
                else:
                    self._consecutive_bad += 1
                    if self.max_consecutive_bad and self._consecutive_bad >= self.max_consecutive_bad:
                        self._unreadable(f"{self._consecutive_bad} unusable samples in a row in {self.spec.spec!r} "
                                         "(max_consecutive_bad_samples)")
                if last:  # a pass: every shard read whole without a usable sample, since the last usable one
                    if lane.usable:
                        lane.bad_shards.clear()  # shared with the lane's _raw_iter: cleared, not replaced
                    elif whole:
                        lane.bad_shards.add(self._visit_shard(stream, visit))
                    lane.usable = False
                    if len(lane.bad_shards) >= self.drawable:
                        self._unreadable(f"no usable sample in a whole pass over {self.spec.spec!r} (each of its "
                                         f"{self.drawable} shards read whole)")
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._lanes = {}

    def __enter__(self) -> "StreamLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state from every rank's (each rank advanced only its own streams)."""
    merged = dict(states[0])
    positions = [list(p) for p in states[0]["positions"]]
    for state in states:
        for stream in state["mine"]:
            positions[stream] = list(state["positions"][stream])
    merged["positions"], merged["mine"] = positions, list(range(len(positions)))
    return merged


class Prefetcher:
    """Reads the next batch in a background thread while the current step computes.

    Yields (batch, stream_state_after_batch): a checkpoint stores the state that belongs to the
    last batch *trained on*, not to the batch already prefetched, so resume stays exact. An error
    in the reader is re-raised in the training thread.
    """

    def __init__(self, stream: StreamLoader):
        self.stream = stream
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                batch = self.stream.next_batch()
                self._put((batch, self.stream.state_dict(), None))
        except BaseException as exc:  # handed to the training thread
            self._put((None, None, exc))

    def _put(self, item) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        batch, state, error = self.queue.get()
        if error is not None:
            self.close()
            raise error
        return batch, state

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
