"""The journal writer's two cluster-mode operations: events copied in as another writer journaled
them (seqs and timestamps unchanged, checked to continue the journal), and a cut back to a seq (lines
the event stream refused after a fence)."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from shared.errors import JournalError
from shared.events import Event
from shared.journal import JournalWriter, read_events

TZ = ZoneInfo("UTC")


def ev(run_id: str, seq: int, event: str = "log", stage: str = "s") -> Event:
    return Event(run_id=run_id, seq=seq, timestamp="2026-01-01T00:00:00.000001+00:00", stage=stage, event=event,  # type: ignore[arg-type]
                 msg=f"m{seq}")


def test_copied_events_keep_their_seqs_and_must_continue_the_journal(tmp_path: Path) -> None:
    with JournalWriter.create(tmp_path, "r1", TZ) as w:
        queued = ev("r1", 1, "queued", "pipeline")
        w.append_copied([queued])
        assert w.last_seq == 1 and not w.ended
        for bad, why in (([ev("r1", 3)], "does not continue"), ([ev("other", 2)], "does not continue"),
                         ([ev("r1", 2), ev("r1", 2)], "does not continue"), ([ev("r1", 2, stage="a/b")], "invalid stage")):
            with pytest.raises(JournalError, match=why):
                w.append_copied(bad)
        assert read_events(tmp_path, "r1") == [queued]  # nothing of a refused copy was written
        mine = w.append("s", "log", "own")
        assert mine.seq == 2
        end = ev("r1", 3, "failure", "pipeline")
        w.append_copied([end])
        assert w.ended
        with pytest.raises(JournalError, match="after its terminal"):
            w.append_copied([ev("r1", 4)])
    assert read_events(tmp_path, "r1") == [queued, mine, end]


def test_cut_back_to_a_seq_then_continue(tmp_path: Path) -> None:
    with JournalWriter.create(tmp_path, "r2", TZ) as w:
        w.append_copied([ev("r2", 1, "queued", "pipeline")])
        w.append_many([("s", "log", f"line {i} " + "x" * 400, None) for i in range(500)])  # 200 KB: the reader bisects
        kept = read_events(tmp_path, "r2")[:301]
        assert w.discard_after(301) > 0
        assert w.last_seq == 301 and read_events(tmp_path, "r2") == kept
        assert w.discard_after(400) == 0  # nothing after it: nothing cut
        theirs = ev("r2", 302, "failure", "pipeline")
        w.append_copied([theirs])
    assert read_events(tmp_path, "r2") == [*kept, theirs]
