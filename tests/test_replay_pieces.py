"""A replay's reading of a journal many blocks long (gateway_svc.runsource.JournalPieces, blocks of
REPLAY_CHUNK): every event once, in order, across block boundaries; a corrupt line in the middle of
the run is a hole said once; the limit (the hub's frontier) cuts a block and the next step goes on
from the limit."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec

from gateway_svc.runsource import REPLAY_CHUNK, Chunk, Hole, JournalPieces
from shared.events import Event
from shared.ids import new_run_id
from shared.journal import JournalReader, JournalWriter, begin_run, journal_path

TZ = ZoneInfo("UTC")


def _long_run(journal_dir: Path, n: int) -> tuple[str, Path]:
    run_id = new_run_id()
    begin_run(journal_dir, run_id, TZ, "p", {}, {"trigger": "manual"})
    with JournalWriter.open(journal_dir, run_id, TZ) as w:
        for i in range(n):
            w.append("s", "log", f"line {i}", {"i": i, "pad": "x" * 100})
        w.append("pipeline", "success", "done")
    return run_id, journal_path(journal_dir, run_id)


async def _read_all(pieces: JournalPieces, after: int, limit: int) -> tuple[list[int], list[tuple[int, int]], bool]:
    seqs: list[int] = []
    holes: list[tuple[int, int]] = []
    terminal = False
    while after < limit:
        got, stop = await pieces.step(after, limit)
        for piece in got:
            if isinstance(piece, Hole):
                holes.append((piece.lo, piece.hi))
                after = piece.hi
                continue
            assert isinstance(piece, Chunk)
            events = msgspec.json.decode(piece.array, type=list[Event])
            assert len(events) == piece.n and events[-1].seq == piece.last_seq
            assert piece.terminal == events[-1].is_terminal
            seqs += [e.seq for e in events]
            after = piece.last_seq
            terminal = piece.terminal
        if stop:
            break
    return seqs, holes, terminal


async def test_a_long_journal_is_replayed_once_in_order_across_blocks_with_its_hole(tmp_path: Path) -> None:
    run_id, path = _long_run(tmp_path, 5_000)
    assert path.stat().st_size > 4 * REPLAY_CHUNK  # several blocks
    lines = path.read_bytes().split(b"\n")
    lines[2_500] = b'{"run_id": "' + run_id.encode() + b'", "seq": 2501, "this line was damaged'  # seq 2501
    path.write_bytes(b"\n".join(lines))
    last = 5_002
    seqs, holes, terminal = await _read_all(JournalPieces(JournalReader(path, run_id)), 0, last)
    assert seqs == [s for s in range(1, last + 1) if s != 2_501]
    assert holes == [(2_501, 2_501)]
    assert terminal


async def test_the_limit_cuts_a_block_and_a_later_step_goes_on_from_it(tmp_path: Path) -> None:
    run_id, path = _long_run(tmp_path, 3_000)
    reader = JournalReader(path, run_id)
    pieces = JournalPieces(reader)
    seqs, holes, terminal = await _read_all(pieces, 100, 1_234)  # a resume from seq 100, the hub at 1,234
    assert seqs == list(range(101, 1_235)) and holes == [] and not terminal
    more, _, terminal = await _read_all(JournalPieces(reader), 1_234, 3_002)
    assert more == list(range(1_235, 3_003)) and terminal
