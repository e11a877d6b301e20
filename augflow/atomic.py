"""Safe file output: never a half-written file, never an existing file or an input replaced unasked.

A file is written to a temporary sibling ``.NAME.PID.XXXX.tmp`` and renamed only when complete (``os.replace`` is
atomic within one file system, which a sibling guarantees), so an interrupted run never leaves a truncated file
under the final name. The temporary file is removed on any exception, ``KeyboardInterrupt`` included
(:func:`unwind_on_sigterm` turns SIGTERM into one); one left by a killed process (kill -9) is swept by the next write
of the same output.

:func:`check_output` (a file) and :func:`check_output_folder` are what every command calls before its first write:
an existing output is replaced only with ``overwrite``, and one of the command's own inputs never.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from augflow.errors import ConfigError


@contextmanager
def atomic_path(path: str | os.PathLike, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    Arguments:
        path: The final file name; parent folders are created.
        private: Give the file mode 0600 (owner only) whatever the umask: for files that hold secrets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    _live.add(tmp)
    try:
        yield tmp
        # mkstemp creates 0600; give the result the mode a plain open() would (0666 minus the umask).
        os.chmod(tmp, 0o600 if private else 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _live.discard(tmp)


_live: set[Path] = set()  # this process's temporary files not yet renamed or removed


def unwind_on_sigterm(grace: float = 5.0) -> None:
    """Make SIGTERM interrupt the process like Ctrl-C, so that every :func:`atomic_path` removes its temporary file.

    Python drops an exception raised while it runs a weakref callback or a ``__del__`` (it only prints "Exception
    ignored"), and a signal can land there; the process would then go on writing. A dropped interrupt therefore
    removes this process's temporary files and exits with status 143 (128 + SIGTERM) at once, and a ``grace``-second
    alarm does the same for one lost anywhere else.
    """
    def interrupt(signum, frame):
        signal.signal(signal.SIGALRM, lambda *_: exit_now())
        signal.setitimer(signal.ITIMER_REAL, grace)
        raise KeyboardInterrupt

    def exit_now():
        for tmp in list(_live):
            tmp.unlink(missing_ok=True)
        print("Aborted!", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)

    def dropped(unraisable, previous=sys.unraisablehook):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            exit_now()
        previous(unraisable)

    sys.unraisablehook = dropped
    signal.signal(signal.SIGTERM, interrupt)


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of ``path`` left by processes that no longer run (killed mid-write).

    A temporary file names its writer's process id (``.NAME.PID.XXXX.tmp``); one whose writer is alive is kept, so
    two processes writing the same output do not break each other. Returns the files removed.
    """
    path = Path(path)
    removed = []
    for name in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
        pid = Path(name).name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        Path(name).unlink(missing_ok=True)
        removed.append(Path(name))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # hard links and symlinks too
    return a.resolve() == b.resolve()


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (),
                 option: str = "--out") -> Path:
    """Check, before any work, that a command may write the file ``path``.

    Arguments:
        path: The output file.
        overwrite: Whether an existing file may be replaced (``--overwrite``).
        inputs: The command's input files (None entries are ignored): never replaced, even with ``overwrite``.
        option: The option that names the output, for the message.

    Returns:
        ``path`` as a Path.

    Raises:
        ConfigError: If ``path`` is an input, a folder, or exists without ``overwrite``.
    """
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise ConfigError(f"{option} {path}: it is also an input of this command ({source}); "
                              f"write the output to another path")
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ConfigError(f"{option} {path}: the file already exists; pass --overwrite to replace it, or choose "
                          f"another path")
    return path


def check_output_folder(folder: str | os.PathLike, overwrite: bool = False, option: str = "--out") -> Path:
    """Check, before any work, that a command may write its files into ``folder``: a new or empty folder, or with
    ``overwrite`` any folder (the command's files of the same names are replaced, others are kept).

    Raises:
        ConfigError: If ``folder`` is a file, or a non-empty folder without ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder}: is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(f"{option} {folder}: the folder is not empty; pass --overwrite to write into it (files of "
                          f"the same names are replaced), or choose a new folder")
    return folder


def atomic_save(obj, path: str | os.PathLike, private: bool = False) -> None:
    """``torch.save`` atomically (``private``: mode 0600, see :func:`atomic_path`)."""
    import torch

    with atomic_path(path, private) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
