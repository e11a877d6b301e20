"""Safe file output: temporary files removed on error or swept after a kill, private modes, overwrite checks."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from augflow.atomic import atomic_path, atomic_write_text, check_output, check_output_folder, sweep_stale_temporaries
from augflow.errors import ConfigError


def test_an_error_removes_the_temporary_file_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt  # what the CLI turns SIGTERM into
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


_SWALLOWED = textwrap.dedent("""
    import os, signal, sys, time
    from augflow.atomic import atomic_path, unwind_on_sigterm

    class Dropper:  # Python drops an exception raised in __del__ ("Exception ignored"), a signal's included
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here, inside __del__

    unwind_on_sigterm(grace=float(sys.argv[2]))
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_text("half")
        Dropper()
        print("interrupt dropped", flush=True)
        while True:  # a writer that did not notice
            time.sleep(0.05)
""")


def test_sigterm_removes_the_temporary_file_even_when_python_drops_the_interrupt(tmp_path):
    out = tmp_path / "a.txt"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _SWALLOWED, str(out), "1"], capture_output=True, text=True,
                          timeout=60)
    assert "interrupt dropped" not in done.stdout and done.stderr.strip() == "Aborted!", done.stderr
    assert done.returncode == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []
    # A drop the hook does not see: the alarm ends the process after the grace period.
    lost = _SWALLOWED.replace("Dropper()", "sys.unraisablehook = lambda _: None; Dropper()")
    done = subprocess.run([sys.executable, "-c", lost, str(out), "1"], capture_output=True, text=True, timeout=60)
    assert "interrupt dropped" in done.stdout and done.stderr.strip() == "Aborted!", done.stderr
    assert done.returncode == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []
    assert time.monotonic() - start < 30


def test_stale_temporaries_of_dead_writers_are_swept_live_ones_kept(tmp_path):
    out = tmp_path / "a[1].h5"  # glob characters in the name are taken literally
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{out.name}.{dead.stdout.strip()}.x1y2.tmp"
    legacy = tmp_path / f".{out.name}.k3j4h5g6.tmp"  # written before temporary files named their process
    live = tmp_path / f".{out.name}.{os.getppid()}.z9.tmp"
    other = tmp_path / ".b.h5.1.z9.tmp"
    for path in (stale, legacy, live, other):
        path.write_text("partial")
    assert sorted(sweep_stale_temporaries(out)) == sorted([stale, legacy])
    atomic_write_text("done", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])


def test_private_files_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text("public", tmp_path / "public.txt")
        with atomic_path(tmp_path / "secret.pt", private=True) as tmp:
            tmp.write_text("seed")
    finally:
        os.umask(old)
    assert (tmp_path / "public.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "secret.pt").stat().st_mode & 0o777 == 0o600


def test_check_output(tmp_path):
    data = tmp_path / "d.h5"
    data.write_text("input")
    (tmp_path / "link.h5").symlink_to(data)
    assert check_output(tmp_path / "new.h5") == tmp_path / "new.h5"
    assert check_output(data, overwrite=True) == data  # an existing file that is no input, with --overwrite
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        check_output(data)
    with pytest.raises(ConfigError, match="also an input"):
        check_output(tmp_path / "link.h5", overwrite=True, inputs=[None, data])
    with pytest.raises(ConfigError, match="is a folder"):
        check_output(tmp_path, overwrite=True)
    assert check_output_folder(tmp_path / "new") == tmp_path / "new"
    with pytest.raises(ConfigError, match="--out-dir .*not empty; pass --overwrite"):
        check_output_folder(tmp_path, option="--out-dir")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_folder(data, overwrite=True)
