"""Which checkpoint a training run continues from: the newest *complete* one in the run's storage.

Every rank of a save writes its DeepSpeed files into its own directory and Ray merges the ranks' directories
into ``<storage>/<run name>/checkpoint_<step>[_final]``. Each rank writes, last, ``p2d_rank_<r>.json``: the
files it wrote and their sizes. A checkpoint is complete when every rank's marker is there and every file
it lists has its size (a rank lost mid-upload leaves a marker or a file missing, or a file short).

Ray's own record (its checkpoint manager, ``checkpoint_manager_snapshot.json``) can lag behind the storage:
a worker lost while the controller had not yet registered the last reports, or a driver stopped by Ctrl-C /
SIGTERM before it wrote its snapshot. :func:`training.worker.restore` takes whichever is newer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

MARKER = "p2d_rank_{rank}.json"
_STEP = re.compile(r"checkpoint_(\d+)")


def write_rank_marker(directory: Path, rank: int) -> None:
    """``p2d_rank_<rank>.json`` in ``directory``: every file under it (relative path -> bytes)."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith("p2d_rank_")
    }
    (directory / MARKER.format(rank=rank)).write_text(json.dumps({"rank": rank, "files": files}))


def checkpoint_step(path: str) -> int:
    """The optimizer step of ``.../checkpoint_0000012[_final]`` (-1 if the name carries none)."""
    m = _STEP.search(Path(str(path)).name)
    return int(m.group(1)) if m else -1


def storage_filesystem(root: str):
    """``(pyarrow filesystem, path)`` for a local directory or a URI (``s3://``, ``gs://``, ...)."""
    import pyarrow.fs as pafs

    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def is_complete(fs, path: str, world: int) -> bool:
    """Every one of ``world`` ranks left its marker in ``path`` and every file it lists has its size."""
    import pyarrow.fs as pafs

    for rank in range(world):
        marker = f"{path}/{MARKER.format(rank=rank)}"
        try:
            with fs.open_input_stream(marker) as f:
                files = json.loads(f.read())["files"]
        except (FileNotFoundError, OSError, ValueError, KeyError):
            return False
        infos = fs.get_file_info([f"{path}/{name}" for name in files])
        if any(i.type != pafs.FileType.File or i.size != files[i.path[len(path) + 1 :]] for i in infos):
            return False
    return True


def newest_complete_checkpoint(root: str | None, world: int) -> tuple[int, str] | None:
    """``(step, path)`` of the newest complete checkpoint under the run's directory ``root``; None if none."""
    import pyarrow.fs as pafs

    if not root:
        return None
    fs, base = storage_filesystem(root)
    try:
        entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return None
    dirs = [e for e in entries if e.type == pafs.FileType.Directory and checkpoint_step(e.path) >= 0]
    # The final checkpoint of a step sorts after a periodic one of the same step.
    for entry in sorted(dirs, key=lambda e: (checkpoint_step(e.path), e.path), reverse=True):
        if is_complete(fs, entry.path, world):
            path = entry.path if "://" not in root else f"{root.split('://')[0]}://{entry.path}"
            return checkpoint_step(entry.path), path
    return None
