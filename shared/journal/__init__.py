"""The run journal: `<home>/events/pipeline_<run_id>.jsonl`, one event per line, one writer at a time.

The writer assigns gapless seqs, writes each event, or each batch of events, with one `os.write` (the
lines are in the OS before anyone publishes them) or, in `fsync` mode, group-commits an fsync every few
milliseconds.
On open it takes an exclusive `flock`, so two writers on one journal fail loudly instead of interleaving,
and it repairs a torn last line left by a crash. Readers use complete lines only, skip and count corrupt
lines, and find any seq by bisecting the file (seqs grow with the offset), so resuming a long run does
not re-read it from the start.
"""

from .files import (
    CHUNK_BYTES,
    JOURNAL_PREFIX,
    JOURNAL_SUFFIX,
    Durability,
    JournalStats,
    fsync_path,
    journal_path,
    list_run_ids,
    remove_older_journals,
    run_id_from_path,
    stats,
    stats_fields,
)
from .reader import JournalReader, read_events
from .retention import remove_expired
from .writer import JournalWriter, begin_run

__all__ = [
    "CHUNK_BYTES", "JOURNAL_PREFIX", "JOURNAL_SUFFIX", "Durability", "JournalReader", "JournalStats",
    "JournalWriter", "begin_run", "fsync_path", "journal_path", "list_run_ids", "read_events",
    "remove_expired", "remove_older_journals", "run_id_from_path", "stats", "stats_fields",
]
