"""What a run read, so that a resume or an evaluation of its held-out split never reads other data unseen.

A new run writes `data.json` into its folder: each source's path, size and SHA-256, as its token cache
recorded them. A resume, or `gptlab eval` of the run's checkpoint without --data, compares the data as it
is now with that record and refuses a change in one line naming what was added, removed or modified,
unless the user accepts it (--accept-data-change); an accepted change is appended to the record's
"changes", and the record then describes the data the run goes on with.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..checkpoint import read_json
from .config import ConfigError

DATA_RECORD = "data.json"
NAMED = 3  # paths named per kind of change; the rest are counted


def sources_of(manifest: dict) -> list[dict]:
    """Path, size and hash of each source a token cache's manifest lists."""
    return [
        {"path": source["path"], "bytes": source["bytes"], "sha256": source["sha256"]}
        for source in manifest["inputs"]["sources"]
    ]


def changes(recorded: list[dict], current: list[dict]) -> list[str]:
    """What differs, in words: 'added a.txt', 'removed b.txt, c.txt', 'modified d.txt' (empty: nothing)."""
    before = {source["path"]: source for source in recorded}
    now = {source["path"]: source for source in current}
    kinds = {
        "added": [path for path in now if path not in before],
        "removed": [path for path in before if path not in now],
        "modified": [path for path in now if path in before and now[path] != before[path]],
    }
    found = []
    for kind, paths in kinds.items():
        if paths:
            more = f" and {len(paths) - NAMED} more" if len(paths) > NAMED else ""
            found.append(f"{kind} {', '.join(paths[:NAMED])}{more}")
    return found


def write_record(run_dir: Path, sources: list[dict], history: list[dict] | None = None) -> None:
    record = {"sources": sources, "changes": history or []}
    (run_dir / DATA_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def check_data(run_dir: Path, manifest: dict, accept: bool, what: str, write: bool = True) -> str | None:
    """Compare the data as read now (a token cache's manifest) with the run's record. A change is a
    ConfigError unless `accept`; accepted, it is recorded (when `write`) and described in the returned line.
    A run without a record (written before records existed) gets one when `write`. `what`: 'resume' or 'eval'."""
    path = run_dir / DATA_RECORD
    current = sources_of(manifest)
    if not path.is_file():
        if write:
            write_record(run_dir, current)
        return None
    record = read_json(path)
    found = changes(record["sources"], current)
    if not found:
        return None
    summary = "; ".join(found)
    if not accept:
        action = "continue the run" if what == "resume" else "score its held-out split"
        raise ConfigError(
            f"the run's data changed since it started ({summary}): restore it, or pass "
            f"--accept-data-change to {action} on the data as it is now"
        )
    if write:
        history = record.get("changes", []) + [
            {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what, "changes": found}
        ]
        write_record(run_dir, current, history)
    return f"the run's data changed since it started ({summary}); going on with it as --accept-data-change asks"
