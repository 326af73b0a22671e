"""The original run's data streams, kept for the rest of a run that resumed at another data-parallel size.

A run writes one loader stream per data-parallel rank (a `ResumableLoader` whose slots are that rank's share of
every epoch), and one optimizer step reads `grad_accum` micro-batches from each. After a resume at another DP size
the stream *set* stays the original one, so every step still sees the same global batch as the uninterrupted run:
the streams, in the original rank order, are dealt out in contiguous groups to the new ranks, and each new rank
reads `per_stream` (the original grad_accum) micro-batches from its first stream, then from its second, ... —
for DP2 -> DP1 with grad_accum 1 -> 2: old rank 0's batch, then old rank 1's. A later resume (same or another DP
size) deals out the same streams again, so resharding twice is as exact as once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from dnascale.data.loader import STATE_FORMAT, LoaderState, ResumableLoader, ShardDataset
from dnascale.errors import DataError

STREAMS_FORMAT = "dnascale-loader-streams/1"


@dataclass(frozen=True)
class StreamSet:
    """Loader states of the original layout's streams (global order) and micro-batches per stream per step."""

    streams: tuple[dict, ...]
    per_stream: int

    @property
    def micro_batch_size(self) -> int:
        return int(self.streams[0]["batch_size"])

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.per_stream * len(self.streams)


def streams_of(loader_state: Mapping[str, Any], grad_accum: int) -> StreamSet:
    """A checkpointed loader state (one ResumableLoader's, or a StreamSetLoader's) as a stream set."""
    if loader_state.get("format") == STREAMS_FORMAT:
        return StreamSet(tuple(loader_state["streams"]), int(loader_state["per_stream"]))
    LoaderState.from_dict(loader_state)  # a one-line DataError when it is neither
    return StreamSet((dict(loader_state),), grad_accum)


def join(sets: list[StreamSet], source: str) -> StreamSet:
    """The data-parallel ranks' stream sets (in rank order) as one global set."""
    per_stream = {s.per_stream for s in sets}
    micro = {s.micro_batch_size for s in sets}
    if len(per_stream) != 1 or len(micro) != 1:
        raise DataError(f"{source}: ranks disagree on micro-batches per stream {sorted(per_stream)} or "
                        f"micro-batch size {sorted(micro)}; the client files are from different runs")
    return StreamSet(tuple(state for s in sets for state in s.streams), per_stream.pop())


def deal(streams: StreamSet, dp_rank: int, dp_size: int, micro_batch_size: int, grad_accum: int,
         source: str) -> StreamSet:
    """This rank's share of the global stream set; a one-line DataError when the new layout cannot keep it exact."""
    old_global, new_global = streams.global_batch_size, micro_batch_size * grad_accum * dp_size
    if micro_batch_size != streams.micro_batch_size:
        raise DataError(f"{source}: written with micro-batch size {streams.micro_batch_size}, this run has "
                        f"{micro_batch_size}; a resharded resume keeps the micro-batch size")
    if len(streams.streams) % dp_size:
        raise DataError(f"{source}: its {len(streams.streams)} data streams do not split over dp={dp_size} "
                        f"ranks; use a data-parallel size that divides {len(streams.streams)}")
    if new_global != old_global:
        need = old_global // (micro_batch_size * dp_size)
        raise DataError(f"{source}: global batch {old_global} (micro {streams.micro_batch_size} x "
                        f"{streams.per_stream} x {len(streams.streams)} streams), this run has {new_global}; "
                        f"use --grad-accum {need} at dp={dp_size}")
    share = len(streams.streams) // dp_size
    return StreamSet(streams.streams[dp_rank * share:(dp_rank + 1) * share], streams.per_stream)


class StreamSetLoader:
    """Reads `per_stream` batches from each of its streams in turn; checkpointable like a ResumableLoader."""

    def __init__(self, data_dir: str | Path, streams: StreamSet, collate_fn: Callable[[list[dict]], Any]):
        self.streams = streams
        self.loaders: list[ResumableLoader] = []
        for state in streams.streams:
            if state.get("format") != STATE_FORMAT:
                raise DataError(f"not a loader state: format {state.get('format')!r}")
            # The original (rank, world_size, workers) fix the stream's slots, so they are rebuilt as they were.
            dataset = ShardDataset(data_dir, state["split"], rank=state["rank"], world_size=state["world_size"],
                                   seed=state["seed"], shuffle=state["shuffle"], infinite=state["infinite"])
            loader = ResumableLoader(dataset, batch_size=state["batch_size"], collate_fn=collate_fn,
                                     num_workers=state["num_workers"])
            loader.load_state_dict(state)
            self.loaders.append(loader)
        self.cursor = (0, 0)  # (stream, batches already read from it in this round)

    def __iter__(self) -> Iterator[Any]:
        iterators = [iter(loader) for loader in self.loaders]
        stream, done = self.cursor
        while True:
            batch = next(iterators[stream])
            done += 1
            if done == self.streams.per_stream:
                stream, done = (stream + 1) % len(iterators), 0
            self.cursor = (stream, done)
            yield batch

    def state_dict(self) -> dict:
        return {"format": STREAMS_FORMAT, "per_stream": self.streams.per_stream, "cursor": list(self.cursor),
                "streams": [loader.state_dict() for loader in self.loaders]}

    def load_cursor(self, state: Mapping[str, Any]) -> None:
        self.cursor = tuple(state.get("cursor", (0, 0)))  # type: ignore[assignment]

