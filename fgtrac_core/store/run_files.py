"""The one trusted path for files a run references (checkpoints), and for writing files into a run directory.

Reading: a recorded path is only ever read through `read_run_file`, which refuses (RunFileError, one line naming
the recorded path) anything but a plain relative path to a regular file inside the run directory:

- absolute paths, ``..`` or empty components, and paths whose resolved form leaves the run directory;
- symbolic links, at the final component (opened with O_NOFOLLOW) and at every parent directory (the resolved
  path must equal the lexical one, and each directory is opened O_NOFOLLOW relative to its parent's descriptor,
  so a link swapped in after the check is refused too);
- anything that is not a regular file (a directory, FIFO, socket or device: opened O_NONBLOCK, so a FIFO never
  blocks, then checked with fstat on the open descriptor);
- a size other than the committed one, or above `max_bytes`, and a SHA-256 other than the committed one.

It reads at most the committed size plus one byte.  The committed facts of a checkpoint come from its ledger
entry, not the `checkpoints` table (`committed_checkpoints`), and the table must agree with the entry.

Writing: temporaries are created exclusively (O_CREAT|O_EXCL|O_NOFOLLOW) under unpredictable names, so a planted
link at a temporary's name is never written through; `remove_stale_temporaries` unlinks (never follows) what a
crashed recorder left behind.

No torch here: `fgtrac_core.checkpoint_files` turns the verified bytes into a checkpoint payload.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from fgtrac_core.errors import CorruptRunError, RunFileError
from fgtrac_core.ledger import decode_entry
from fgtrac_core.store.layout import CHECKPOINT_DIR, SNAPSHOT_DB, RunLayout

#: refuse to read a run file into memory above this size (the committed size must match the file's anyway)
MAX_RUN_FILE_BYTES = 8 << 30
_CHUNK = 1 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint file's facts as its ledger entry committed them (path relative to the run directory)."""

    checkpoint_id: int
    path: str
    sha256: str
    size_bytes: int


# ------------------------------------------------------------------------------------------- reading


def read_run_file(
    layout: RunLayout,
    relative_path: str,
    *,
    sha256: str,
    size_bytes: int,
    max_bytes: int = MAX_RUN_FILE_BYTES,
    what: str = "run file",
) -> bytes:
    """The bytes of the file at `relative_path` inside the run, checked against its committed size and SHA-256.

    Raises RunFileError (one line: `what`, the recorded path and the problem) for anything refused (module doc).
    """
    chunks: list[bytes] = []
    _read_checked(layout, relative_path, sha256, size_bytes, max_bytes, what, chunks.append)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def run_file_problem(
    layout: RunLayout, relative_path: str, *, sha256: str, size_bytes: int, what: str = "run file"
) -> str | None:
    """None when the file passes every check of `read_run_file`, else the one-line problem.  Streams the file
    (no size cap, nothing kept in memory)."""
    try:
        _read_checked(layout, relative_path, sha256, size_bytes, None, what, lambda _block: None)
    except RunFileError as exc:
        return str(exc)
    return None


def read_checkpoint_file(
    layout: RunLayout, committed: CommittedCheckpoint, *, max_bytes: int = MAX_RUN_FILE_BYTES
) -> bytes:
    """The bytes of a checkpoint file, checked against the facts its ledger entry committed."""
    return read_run_file(
        layout,
        committed.path,
        sha256=committed.sha256,
        size_bytes=committed.size_bytes,
        max_bytes=max_bytes,
        what=f"checkpoint {committed.checkpoint_id} file",
    )


def checkpoint_file_problem(layout: RunLayout, committed: CommittedCheckpoint) -> str | None:
    """For the verifier: None when the checkpoint file is inside the run, a regular file (no links) and of the
    committed size and SHA-256; else one line naming the checkpoint, its recorded path and the problem."""
    return run_file_problem(
        layout,
        committed.path,
        sha256=committed.sha256,
        size_bytes=committed.size_bytes,
        what=f"checkpoint {committed.checkpoint_id} file",
    )


def _read_checked(
    layout: RunLayout,
    rel: Any,
    sha256: Any,
    size_bytes: Any,
    max_bytes: int | None,
    what: str,
    sink: Callable[[bytes], None],
) -> None:
    def refuse(problem: str) -> RunFileError:
        return RunFileError(f"{what} {rel!r} {problem}")

    if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes < 0:
        raise refuse(f"has no valid committed size ({size_bytes!r})")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise refuse(f"has no valid committed SHA-256 ({sha256!r})")
    if max_bytes is not None and size_bytes > max_bytes:
        raise refuse(f"is too large to load: its committed size {size_bytes} bytes exceeds the {max_bytes} limit")
    with _open_inside(layout, rel, refuse) as fd:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"is not a regular file (it is {_file_type(st.st_mode)})")
        if st.st_size != size_bytes:
            raise refuse(f"does not match the ledger: it is {st.st_size} bytes, committed {size_bytes}")
        h = hashlib.sha256()
        remaining = size_bytes + 1  # one byte more than committed: a file that grew while being read is caught
        read = 0
        while remaining:
            try:
                block = os.read(fd, min(remaining, _CHUNK if max_bytes is None else 1 << 30))
            except OSError as exc:
                raise refuse(f"cannot be read ({exc.strerror})") from None
            if not block:
                break
            h.update(block)
            sink(block)
            read += len(block)
            remaining -= len(block)
        if read != size_bytes:
            raise refuse(f"changed size while being read ({read} bytes, committed {size_bytes})")
        digest = h.hexdigest()
        if digest != sha256.lower():
            raise refuse(f"does not match the ledger: its SHA-256 is {digest[:16]}..., committed {sha256[:16]}...")


def _plain_parts(rel: Any, refuse: Callable[[str], RunFileError]) -> list[str]:
    """The components of a plain relative path (refusing anything else)."""
    if not isinstance(rel, str) or not rel:
        raise refuse("is not a path")
    if "\x00" in rel:
        raise refuse("holds a NUL byte")
    if rel.startswith("/"):
        raise refuse("is an absolute path; a run records paths relative to its directory")
    parts = rel.split("/")
    if ".." in parts:
        raise refuse("has a '..' component; refusing a path that may leave the run directory")
    if any(p in ("", ".") for p in parts):
        raise refuse("is not a plain relative path (empty or '.' component)")
    return parts


@contextmanager
def _open_inside(layout: RunLayout, rel: Any, refuse: Callable[[str], RunFileError]) -> Iterator[int]:
    """A read-only descriptor of the file at `rel` inside the run, opened without following any link."""
    parts = _plain_parts(rel, refuse)
    root = Path(os.path.realpath(layout.root))
    lexical = root.joinpath(*parts)
    resolved = Path(os.path.realpath(lexical))
    if not resolved.is_relative_to(root) or resolved == root:
        raise refuse("resolves outside the run directory (through a symbolic link)")
    if resolved != lexical:
        raise refuse("goes through a symbolic link; refusing it")
    fds: list[int] = []
    try:
        try:
            fds.append(os.open(root, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC))
        except OSError as exc:
            raise refuse(f"cannot be read: the run directory cannot be opened ({exc.strerror})") from None
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC
            flags |= (os.O_NONBLOCK | _O_NOCTTY) if last else os.O_DIRECTORY
            try:
                fds.append(os.open(part, flags, dir_fd=fds[-1]))
            except FileNotFoundError:
                raise refuse("is missing") from None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # ELOOP: a link at O_NOFOLLOW; ENOTDIR: a link or file as a parent
                    raise refuse("goes through a symbolic link or a non-directory; refusing it") from None
                raise refuse(f"cannot be opened ({exc.strerror})") from None
        yield fds[-1]
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


# ------------------------------------------------------------------------------------------- committed facts


def committed_checkpoints(source: Any) -> dict[int, CommittedCheckpoint]:
    """Every checkpoint's committed facts, from its ledger entry, keyed by checkpoint id.

    `source` is a DuckDB connection or a `RunStore`.  Raises RunFileError when a `checkpoints` row has no ledger
    entry, when the row and its entry disagree on path, SHA-256 or size, or when an entry cannot be decoded.
    """
    rows = _query(source, "SELECT checkpoint_id, path, sha256, size_bytes FROM checkpoints ORDER BY checkpoint_id")
    entries = _query(source, "SELECT seq, ref_id, entry FROM ledger WHERE kind = 'checkpoint' ORDER BY seq")
    return _committed(rows, entries)


def committed_checkpoint(source: Any, checkpoint_id: int) -> CommittedCheckpoint:
    """One checkpoint's committed facts, from its ledger entry (see `committed_checkpoints`)."""
    cid = int(checkpoint_id)
    rows = _query(
        source, "SELECT checkpoint_id, path, sha256, size_bytes FROM checkpoints WHERE checkpoint_id = ?", [cid]
    )
    if not rows:
        raise RunFileError(f"checkpoint {cid} is not recorded in this run")
    entries = _query(
        source, "SELECT seq, ref_id, entry FROM ledger WHERE kind = 'checkpoint' AND ref_id = ? ORDER BY seq", [cid]
    )
    return _committed(rows, entries)[cid]


def _committed(rows: list[tuple], entries: list[tuple]) -> dict[int, CommittedCheckpoint]:
    bodies: dict[int, dict[str, Any]] = {}
    for seq, ref_id, entry in entries:
        try:
            kind, body = decode_entry(bytes(entry))
        except (ValueError, TypeError) as exc:
            raise RunFileError(f"ledger entry seq={seq} (a checkpoint) cannot be decoded: {exc}") from None
        cid = body.get("checkpoint_id")
        if kind != "checkpoint" or cid != ref_id or not isinstance(cid, int):
            raise RunFileError(f"ledger entry seq={seq} is not the checkpoint entry its row claims ({ref_id})")
        if cid in bodies:
            raise RunFileError(f"checkpoint {cid} has more than one ledger entry (seq={seq})")
        bodies[cid] = body
    out = {}
    for cid, path, sha, size in rows:
        cid = int(cid)
        body = bodies.get(cid)
        if body is None:
            raise RunFileError(f"checkpoint {cid} ({path!r}) has no ledger entry; refusing to read its file")
        for field, table_value in (("path", path), ("sha256", sha), ("size_bytes", size)):
            if body.get(field) != table_value:
                raise RunFileError(
                    f"checkpoint {cid}: the checkpoints table's {field} {table_value!r} differs from its ledger "
                    f"entry's {body.get(field)!r}; refusing to read its file"
                )
        out[cid] = CommittedCheckpoint(cid, body["path"], body["sha256"], body["size_bytes"])
    return out


def _query(source: Any, sql: str, params: list[Any] | None = None) -> list[tuple]:
    rows = getattr(source, "_rows", None)
    if rows is not None:  # a RunStore: its errors already are one line
        return rows(sql, params or [])
    try:
        with source.cursor() as cur:
            return cur.execute(sql, params or []).fetchall()
    except duckdb.Error as exc:
        text = str(exc).strip().splitlines()
        raise CorruptRunError(f"the run database is damaged ({text[0] if text else type(exc).__name__})") from None


# ------------------------------------------------------------------------------------------- writing


def temporary_name(name: str) -> str:
    """An unpredictable temporary name for `name` in the same directory (`NAME.tmp-<random>`)."""
    return f"{name}.tmp-{secrets.token_hex(16)}"


def create_exclusive(dir_fd: int, name: str, mode: int = 0o644) -> int:
    """A new file `name` in the directory `dir_fd`, opened for writing; never an existing file or a link."""
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC, mode, dir_fd=dir_fd)


def open_directory(path: Path) -> int:
    """A descriptor of the directory `path`; refuses (OSError) when its last component is a symbolic link."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC)


def remove_stale_temporaries(layout: RunLayout) -> list[str]:
    """Unlink the temporaries a crashed recorder may have left (`snapshot.duckdb.tmp*` in the run directory,
    `checkpoints/*.tmp*`), never following a link and never entering a linked `checkpoints` directory.  Call it
    only while holding the live database (no publish can be in flight).  Returns the paths removed."""
    removed: list[str] = []
    for sub, matches in (
        (None, lambda n: n.startswith(SNAPSHOT_DB + ".tmp")),
        (CHECKPOINT_DIR, lambda n: ".tmp" in n),
    ):
        try:
            dfd = open_directory(layout.root if sub is None else layout.root / sub)
        except OSError:
            continue  # missing, or a link: nothing of ours to clean
        try:
            with os.scandir(dfd) as it:
                names = [e.name for e in it if matches(e.name) and not e.is_dir(follow_symlinks=False)]
            for name in names:
                try:
                    os.unlink(name, dir_fd=dfd)
                except OSError:
                    continue
                removed.append(name if sub is None else f"{sub}/{name}")
        finally:
            os.close(dfd)
    return removed


def replace_atomically(path: Path, fill: Callable[[int], None]) -> None:
    """Replace `path` atomically and durably: `fill(fd)` writes an exclusively created temporary beside it (never a
    planted file or link), which is fsync'd, then renamed over `path` (replacing a link there, never its target).
    Refuses (OSError) when `path`'s directory is itself a symbolic link."""
    dir_fd = open_directory(path.parent)
    try:
        tmp = temporary_name(path.name)
        fd = create_exclusive(dir_fd, tmp)
        try:
            try:
                fill(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `replace_atomically`."""

    def fill(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    replace_atomically(path, fill)
