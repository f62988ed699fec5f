"""Small file I/O shared by the stages: atomic writes (TSV, JSON, Parquet), TSV reading, checksums.

Every output is written to a temporary name in its folder, fsynced and renamed, so a killed
job never leaves a partial file under the final name, and a failed write (a full disk) leaves
no temporary file behind. Outputs get the mode a plain ``open()`` would give (the umask applies).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def umask() -> int:
    """The process's umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale(path: Path) -> None:
    """Remove the temporary files (or folders) a killed writer of ``path`` left next to it."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


ROW_GROUP_BYTES = 64 << 20


def row_group_rows(table: pa.Table) -> int:
    """Rows of a row group of about ``ROW_GROUP_BYTES``."""
    return max(1, int(ROW_GROUP_BYTES * table.num_rows / max(1, table.nbytes)))


def write_table(table: pa.Table, path: str | Path) -> None:
    """Parquet (zstd) in row groups of about 64 MiB, so readers can stream it."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows(table))


def write_tsv(path: str | Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def read_tsv(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def write_json(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256(path: str | Path, cache: bool = True) -> str:
    """SHA-256 of a file. ``cache``: remember it in a ``.<name>.sha256`` sidecar keyed on size and
    mtime (checkpoints are GBs, and every job records the checksum of the one it used)."""
    path = Path(path)
    st = path.stat()
    key = f"{st.st_size} {st.st_mtime_ns}"
    sidecar = path.with_name(f".{path.name}.sha256")
    try:
        cached_key, digest = sidecar.read_text().rsplit(" ", 1)
        if cache and cached_key == key:
            return digest
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    if cache:
        try:
            sidecar.write_text(f"{key} {h.hexdigest()}")
        except OSError:
            pass
    return h.hexdigest()
