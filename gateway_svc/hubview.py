"""What a streaming client may see of the hub: delivery positions, the cursor's ingredients, and its
own registration; not the run index, the publishers or the hub's tasks. The Hub provides it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .fanout import Receiver
    from .runsource import RunSource


class HubView(Protocol):
    tag: bytes  # the journal directory's (or the cluster's) name in cursors
    journal_dir: Path
    source: RunSource  # where replays read (the journal, or the event stream in cluster mode)

    def frontier(self, run_id: str) -> int:
        """The last seq of the run delivered to clients (0: none, or unknown run)."""

    def positions(self) -> dict[str, int]:
        """{run_id: frontier} of every run not ended."""

    @property
    def discoveries(self) -> int:
        """How many runs the hub has learnt of so far (a client's "new since" mark)."""

    def discovered_after(self, number: int) -> list[str]: ...

    def created_us(self, run_id: str) -> int | None:
        """When the run was created (its `queued` timestamp), if known."""

    def live_cursor(self) -> str:
        """The all-runs cursor of a client that has every delivery so far."""

    def recent_done(self, t: int) -> list[str]:
        """Ended runs a cursor made at unix second t must name (created after t - MARGIN_S)."""

    def flush(self) -> None:
        """Offer every delivered event now (before reading positions on a client's behalf)."""

    def register(self, client: Receiver) -> None: ...

    def unregister(self, client: Receiver) -> None: ...

    def note_gap(self, run_id: str, lo: int, hi: int) -> None: ...

    def gap_frame(self, run_id: str, lo: int, hi: int) -> bytes: ...
