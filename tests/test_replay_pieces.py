"""A replay's reading of a journal many blocks long (gateway_svc.runsource.JournalPieces, blocks of
REPLAY_CHUNK): every event once, in order, across block boundaries; a corrupt line in the middle of
the run is a hole said once; the limit (the hub's frontier) cuts a block and the next step goes on
from the limit. Blocks found clean are remembered (gateway_svc.cleanblocks) and sent again as they
are: the same bytes as decoding them, from any seq to any limit; a remembered block whose bytes
changed is said and decoded again."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec

from gateway_svc.cleanblocks import CleanBlocks
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
    seqs, holes, terminal = await _read_all(JournalPieces(JournalReader(path, run_id), CleanBlocks()), 0, last)
    assert seqs == [s for s in range(1, last + 1) if s != 2_501]
    assert holes == [(2_501, 2_501)]
    assert terminal


async def test_the_limit_cuts_a_block_and_a_later_step_goes_on_from_it(tmp_path: Path) -> None:
    run_id, path = _long_run(tmp_path, 3_000)
    reader = JournalReader(path, run_id)
    pieces = JournalPieces(reader, CleanBlocks())
    seqs, holes, terminal = await _read_all(pieces, 100, 1_234)  # a resume from seq 100, the hub at 1,234
    assert seqs == list(range(101, 1_235)) and holes == [] and not terminal
    more, _, terminal = await _read_all(JournalPieces(reader, CleanBlocks()), 1_234, 3_002)
    assert more == list(range(1_235, 3_003)) and terminal


async def _stream(path: Path, run_id: str, clean: CleanBlocks, after: int, limit: int) -> tuple[list[bytes], list[tuple[int, int]], bool]:
    """What a replay sends from `after` up to `limit`: each frame's events as bytes, the holes, whether
    the run's end came."""
    frames: list[bytes] = []
    holes: list[tuple[int, int]] = []
    terminal = False
    pieces = JournalPieces(JournalReader(path, run_id), clean)
    while after < limit:
        got, stop = await pieces.step(after, limit)
        for piece in got:
            if isinstance(piece, Hole):
                holes.append((piece.lo, piece.hi))
                after = piece.hi
            else:
                frames.append(piece.array)
                after, terminal = piece.last_seq, piece.terminal
        if stop:
            break
    return frames, holes, terminal


def _events(frames: list[bytes]) -> bytes:
    return b",".join(f[1:-1] for f in frames)  # the events' bytes, however they were cut into frames


async def test_blocks_found_clean_are_sent_again_as_they_are_the_same_bytes_from_any_seq(tmp_path: Path) -> None:
    run_id, path = _long_run(tmp_path, 5_000)
    lines = path.read_bytes().split(b"\n")
    lines[2_500] = b'{"run_id": "' + run_id.encode() + b'", "seq": 2501, "this line was damaged'
    path.write_bytes(b"\n".join(lines))
    clean = CleanBlocks()
    cold = await _stream(path, run_id, clean, 0, 5_002)
    blocks = len(clean)
    assert blocks >= 4 and clean.hits == 0  # all but the damaged block remembered
    warm = await _stream(path, run_id, clean, 0, 5_002)
    assert warm == cold  # frame for frame, byte for byte
    assert clean.hits == blocks and len(clean) == blocks
    # from any seq to any limit (a resume, the hub's frontier mid-block): the same events as decoding
    for after, limit in [(0, 1), (1, 2), (99, 1_234), (2_499, 2_502), (2_501, 5_002), (3_000, 3_001), (4_999, 5_002)]:
        fresh = await _stream(path, run_id, CleanBlocks(), after, limit)
        remembered = await _stream(path, run_id, clean, after, limit)
        assert _events(remembered[0]) == _events(fresh[0]), (after, limit)
        assert remembered[1:] == fresh[1:], (after, limit)
    assert clean.changed == 0


async def test_a_remembered_block_whose_bytes_changed_is_said_and_decoded_again(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    run_id, path = _long_run(tmp_path, 3_000)
    clean = CleanBlocks()
    await _stream(path, run_id, clean, 0, 3_002)
    blocks = len(clean)
    assert blocks >= 2
    data = path.read_bytes()
    same_length = data.replace(b'"line 1500"', b'"LINE 1500"').replace(b'"i":2000,', b'"i":[{}],', 1)
    assert len(same_length) == len(data) and same_length != data
    path.write_bytes(same_length)  # an edit in place: the lengths are as remembered, the bytes are not
    frames, holes, terminal = await _stream(path, run_id, clean, 0, 3_002)
    assert clean.changed == 1 and "changed at bytes" in caplog.text and str(path) in caplog.text
    assert b'"LINE 1500"' in _events(frames) and holes == [] and terminal  # the edit is what was sent
    # the run's memory was dropped; the blocks read since are remembered again, the rest next time
    await _stream(path, run_id, clean, 0, 3_002)
    assert len(clean) == blocks
    # a line made garbage with the same length: decoded, so skipped and a hole, never sent as it is
    data = path.read_bytes()
    start = data.index(b'"seq":1000,')
    garbage = data[:start] + b"\x00" * 10 + data[start + 10:]
    path.write_bytes(garbage)
    frames, holes, terminal = await _stream(path, run_id, clean, 0, 3_002)
    assert holes == [(1_000, 1_000)] and b"\x00" not in _events(frames) and terminal
    assert clean.changed == 2
