"""One path abstraction for every file the project reads or writes outside Orbax: local paths and
``gs://`` (or any other scheme ``etils.epath`` serves through fsspec, e.g. ``s3://``) alike.

Everything goes through :func:`path` (an ``epath.Path``); failures a user can fix (a missing file,
a directory where a file should be, a path under a regular file) become :class:`FsError` with a
one-line message naming the flag or field. TensorBoard event files go through the same
abstraction (:func:`summary_writer`). Remote paths need the scheme's fsspec package (``gcsfs``
for ``gs://``); see the BUILD_NOTES section "Sharded evaluation, filesystems and input checks".
"""

from __future__ import annotations

import glob as glob_lib
import io
import json
import os
from typing import IO, Any

from etils import epath

REMOTE_SCHEMES = ("gs", "s3", "az", "hf")


class FsError(OSError):
    """A path that cannot be used as asked; the message names the flag/field and the fix."""

    def __str__(self) -> str:  # OSError would format (errno, strerror); keep the one line as given
        return str(self.args[0]) if self.args else ""


def is_remote(p: Any) -> bool:
    s = os.fspath(p)
    return "://" in s and s.split("://", 1)[0] in REMOTE_SCHEMES


def path(p: Any) -> epath.Path:
    """An ``epath.Path`` for a local path (``~`` expanded) or a remote URI."""
    s = os.fspath(p)
    if "://" in s and not is_remote(s):
        raise FsError(f"{s}: unsupported scheme {s.split('://', 1)[0]!r}://; use a local path or one "
                      f"of {', '.join(x + '://' for x in REMOTE_SCHEMES)}")
    return epath.Path(s if is_remote(s) else os.path.expanduser(s))


def join(*parts: Any) -> str:
    return os.fspath(path(parts[0]).joinpath(*[os.fspath(x) for x in parts[1:]]))


def exists(p: Any) -> bool:
    return path(p).exists()


def isdir(p: Any) -> bool:
    return path(p).is_dir()


def _file_ancestor(p: epath.Path) -> epath.Path | None:
    """The nearest existing ancestor of a local path (or the path itself) that is not a directory."""
    for q in [p, *p.parents]:
        if q.exists():
            return None if q.is_dir() else q
    return None


def makedirs(p: Any, what: str = "directory") -> str:
    """Creates ``p`` and its parents if needed (a no-op where object stores have no directories)."""
    pp = path(p)
    if not is_remote(pp):
        blocker = _file_ancestor(pp)
        if blocker is not None:
            raise FsError(f"{what}={os.fspath(p)}: {os.fspath(blocker)} is a file, not a directory; "
                          "choose a path whose parents are directories")
    try:
        pp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FsError(f"{what}={os.fspath(p)}: cannot create the directory "
                      f"({e.strerror or type(e).__name__})") from None
    return os.fspath(pp)


def open(p: Any, mode: str = "r", what: str = "file") -> IO:  # noqa: A001  (mirrors builtins.open)
    """Opens a local or remote file; a missing file or a directory is a one-line :class:`FsError`."""
    pp = path(p)
    if "r" in mode:
        if not pp.exists():
            raise FsError(f"{what}={os.fspath(p)}: no such file")
        if pp.is_dir():
            raise FsError(f"{what}={os.fspath(p)}: is a directory, not a file")
    else:
        parent = pp.parent
        if not is_remote(pp):
            blocker = _file_ancestor(parent)
            if blocker is not None:
                raise FsError(f"{what}={os.fspath(p)}: {os.fspath(blocker)} is a file, not a "
                              "directory; choose another path")
            if pp.is_dir():
                raise FsError(f"{what}={os.fspath(p)}: is a directory; give a file name")
        parent.mkdir(parents=True, exist_ok=True)
    return pp.open(mode)


def read_bytes(p: Any, what: str = "file") -> bytes:
    with open(p, "rb", what) as f:
        return f.read()


def read_text(p: Any, what: str = "file") -> str:
    """UTF-8 text; a file that is not UTF-8 is a one-line :class:`FsError`."""
    data = read_bytes(p, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FsError(f"{what}={os.fspath(p)}: not UTF-8 text (byte {e.start} is "
                      f"{data[e.start:e.start + 1]!r})") from None


def write_bytes(p: Any, data: bytes, what: str = "file") -> str:
    """Writes ``data`` whole. Local files are written to a temporary name and renamed, so a reader
    never sees half a file; object-store uploads are atomic already."""
    pp = path(p)
    if is_remote(pp):
        with open(pp, "wb", what) as f:
            f.write(data)
        return os.fspath(pp)
    tmp = pp.with_name(f".{pp.name}.tmp{os.getpid()}")
    with open(tmp, "wb", what) as f:
        f.write(data)
    os.replace(tmp, pp)
    return os.fspath(pp)


def write_text(p: Any, text: str, what: str = "file") -> str:
    return write_bytes(p, text.encode("utf-8"), what)


def write_json(p: Any, obj: Any, what: str = "file") -> str:
    return write_text(p, json.dumps(obj, indent=2) + "\n", what)


def read_json(p: Any, what: str = "file") -> Any:
    text = read_text(p, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FsError(f"{what}={os.fspath(p)}: not valid JSON (line {e.lineno}: {e.msg})") from None


def glob(pattern: str) -> list[str]:
    """Sorted files matching ``pattern`` (``**`` recurses for local paths; remote patterns match
    within the directory before the first wildcard component)."""
    if not is_remote(pattern):
        return sorted(f for f in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                      if os.path.isfile(f))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    first = next((i for i, x in enumerate(parts) if any(c in x for c in "*?[")), len(parts))
    root = path(f"{scheme}://" + "/".join(parts[:first]))
    if first == len(parts):
        return [os.fspath(root)] if root.exists() and not root.is_dir() else []
    return sorted(os.fspath(q) for q in root.glob("/".join(parts[first:])) if not q.is_dir())


# TensorBoard ---------------------------------------------------------------------------------------

class _RemoteEventFile:
    """A TensorBoard event file on an object store: records are buffered and each flush uploads
    the whole file (object stores cannot append; scalar event files stay small)."""

    def __init__(self, p: str):
        self.path = p
        self.buffer = io.BytesIO()

    def write(self, data: bytes):
        self.buffer.write(data)

    def flush(self):
        write_bytes(self.path, self.buffer.getvalue(), "TensorBoard event file")

    def close(self):
        self.flush()


class _RemoteEventFactory:
    def open(self, p: str) -> _RemoteEventFile:
        return _RemoteEventFile(p)

    def directory_check(self, p: str):
        makedirs(p, "TensorBoard logdir")


def summary_writer(logdir: Any):
    """A ``tensorboardX.SummaryWriter`` for a local or remote ``logdir`` (remote event files are
    written through :func:`path`, not through tensorboardX's own cloud clients)."""
    from tensorboardX import SummaryWriter, record_writer

    logdir = os.fspath(logdir)
    if is_remote(logdir):
        for scheme in REMOTE_SCHEMES:
            record_writer.register_writer_factory(scheme, _RemoteEventFactory())
    else:
        makedirs(logdir, "TensorBoard logdir")
    return SummaryWriter(logdir)
