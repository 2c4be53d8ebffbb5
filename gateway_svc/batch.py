"""What the fan-out hands to clients: a batch of delivered events, each encoded once, whose frames are
built once for every client that takes the whole batch (or one run's part of it), and the notice (the
`journal_gap` frame) that goes between batches."""

from __future__ import annotations

from collections.abc import Iterable

from shared.events import Event
from shared.protocol import encode_event, events_frame


class Batch:
    """Events delivered together, each encoded once; clients take the whole batch or their run's part.
    A client with nothing else queued sends the batch's frame, built once for all such clients."""

    __slots__ = ("events", "parts", "nbytes", "cursor", "by_run", "terminal_runs", "_joined", "_run_joined",
                 "_frame", "_run_frames")

    def __init__(self, events: list[Event], parts: list[bytes], by_run: dict[str, list[int]],
                 nbytes: int, terminal_runs: set[str]) -> None:
        self.events = events
        self.parts = parts
        self.nbytes = nbytes  # the parts as lines (each with its newline)
        self.by_run = by_run
        self.terminal_runs = terminal_runs
        self.cursor = ""  # the all-runs cursor after this batch (set when all-runs clients exist)
        self._joined: bytes | None = None
        self._run_joined: dict[str, bytes] = {}
        self._frame: bytes | None = None
        self._run_frames: dict[str, bytes] = {}

    def frame(self) -> bytes:
        """The all-runs `events` frame of this batch alone."""
        if self._frame is None:
            self._frame = events_frame([self.joined()], self.cursor)
        return self._frame

    def run_frame(self, run_id: str) -> bytes:
        """The `events` frame of this batch's part for one run (its cursor: that run's last seq)."""
        data = self._run_frames.get(run_id)
        if data is None:
            data = self._run_frames[run_id] = events_frame([self.run_joined(run_id)], str(self.run_last_seq(run_id)))
        return data

    def joined(self) -> bytes:
        if self._joined is None:
            self._joined = b",".join(self.parts)
        return self._joined

    def run_size(self, run_id: str) -> tuple[int, int]:
        """(events, bytes as lines) of one run's part of the batch."""
        idx = self.by_run.get(run_id)
        if not idx:
            return 0, 0
        if len(idx) == len(self.parts):
            return len(idx), self.nbytes  # the batch is this run's alone: the usual case
        return len(idx), sum(len(self.parts[i]) for i in idx) + len(idx)

    def run_lines(self, run_id: str) -> bytes:
        """One run's part of the batch as journal lines (each event's JSON and a newline)."""
        idx, parts = self.by_run[run_id], self.parts
        if len(idx) != len(parts):
            parts = [parts[i] for i in idx]
        return b"\n".join(parts) + b"\n"

    def run_joined(self, run_id: str) -> bytes:
        data = self._run_joined.get(run_id)
        if data is None:
            data = self._run_joined[run_id] = b",".join(self.parts[i] for i in self.by_run[run_id])
        return data

    def run_last_seq(self, run_id: str) -> int:
        return self.events[self.by_run[run_id][-1]].seq

    def items(self, run_id: str | None) -> Iterable[tuple[Event, bytes]]:
        """(event, its JSON) of the whole batch (run_id None) or of one run's part."""
        if run_id is None:
            return zip(self.events, self.parts, strict=True)
        return ((self.events[i], self.parts[i]) for i in self.by_run.get(run_id, ()))


class Collector:
    """A batch being collected: each event is encoded once, as it is delivered."""

    __slots__ = ("events", "parts", "by_run", "nbytes", "terminal_runs")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.parts: list[bytes] = []
        self.by_run: dict[str, list[int]] = {}
        self.nbytes = 0
        self.terminal_runs: set[str] = set()

    def __len__(self) -> int:
        return len(self.events)

    def add(self, ev: Event) -> None:
        i = len(self.events)
        self.events.append(ev)
        part = encode_event(ev)
        self.parts.append(part)
        self.nbytes += len(part) + 1
        idx = self.by_run.get(ev.run_id)
        if idx is None:
            self.by_run[ev.run_id] = [i]
        else:
            idx.append(i)
        if ev.is_terminal:
            self.terminal_runs.add(ev.run_id)

    def take(self) -> Batch | None:
        """The batch collected so far (None if empty); collecting starts again."""
        if not self.events:
            return None
        batch = Batch(self.events, self.parts, self.by_run, self.nbytes, self.terminal_runs)
        self.events, self.parts, self.by_run, self.nbytes, self.terminal_runs = [], [], {}, 0, set()
        return batch


def batch_of(events: list[Event]) -> Batch:
    """A batch of these events (as the fan-out would make it), for tests and tools."""
    out = Collector()
    for ev in events:
        out.add(ev)
    batch = out.take()
    assert batch is not None, "a batch of no events"
    return batch


class Notice:
    """A frame for the clients of one run (and all-runs clients), sent in order between batches: the
    `journal_gap` frame, which does not end the stream."""

    __slots__ = ("run_id", "frame")

    def __init__(self, run_id: str, frame: bytes) -> None:
        self.run_id = run_id
        self.frame = frame
