"""Run ``diffusionseg segment`` in a child process: start, poll progress, cancel, wait.

Inside Slicer the segmentation must not block the UI, and a cancel must really stop the
computation (torch holds the GIL-free C++ threads of the whole process), so the CLI runs as a
separate process. :class:`SegmentJob` is pure standard library (no Qt, no torch): Slicer's module
polls it from a QTimer, scripts and tests call :meth:`SegmentJob.wait`.

The child reports progress as ``DIFFUSIONSEG_PROGRESS {json}`` lines on stdout (``--progress json``)
and user errors as one ``diffusionseg: error: ...`` line on stderr with exit status 2. Reader
threads drain both pipes, so a chatty child never blocks on a full pipe.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from DiffusionSegLib.cli.protocol import ERROR_PREFIX, PROGRESS_PREFIX
from DiffusionSegLib.core.enums import Stage
from DiffusionSegLib.pipeline.settings import SegmentSettings

# The folder that holds the DiffusionSegLib package: the child's PYTHONPATH. Inside Slicer the
# library sits next to the module file, not in site-packages, so the child would not find it.
LIBRARY_PARENT = Path(__file__).resolve().parents[2]
_READER_JOIN_S = 5.0  # pipes close when the child exits; this only bounds a stuck grandchild holding them
# Cancel asks first (SIGTERM: the CLI then removes its temporary files), then forces (SIGKILL: torch
# inside a long C++ call cannot run Python's handler soon). Only a process stuck in the kernel
# outlives the second wait; cancel then returns anyway and poll() reports the exit later.
_TERM_GRACE_S = 3.0
_KILL_WAIT_S = 5.0
_POLL_S = 0.02

log = logging.getLogger(__name__)


@dataclass
class JobStatus:
    """What the child reported so far.

    ``stage`` is "starting" until the first progress line, then the CLI's stage (load, sampling, crf,
    restore, write), "cancelled" after :meth:`SegmentJob.cancel`. ``finished`` is True once the child
    has exited and its output has been read (``returncode`` is then its exit status, negative: killed
    by that signal on POSIX), or once the job was cancelled before it started (``returncode`` None).
    ``error`` is the CLI's one-line error (or the last stderr line of a crash) when the run failed,
    else None.
    """

    stage: str
    done: int
    total: int
    finished: bool
    returncode: int | None
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.finished and self.returncode == 0


class SegmentJob:
    """One ``python -m DiffusionSegLib segment`` child process writing into ``output_dir``.

    ``argv`` (built at construction, public so callers can log it) is
    ``[python, "-m", "DiffusionSegLib", "segment", input, "-o", output_dir, "--progress", "json",
    *settings.to_argv()]``. ``python`` is the child's interpreter (inside Slicer: PythonSlicer).
    """

    def __init__(self, input_path: str | os.PathLike, output_dir: str | os.PathLike, settings: SegmentSettings,
                 python: str = sys.executable):
        self.input_path = Path(input_path)
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.argv = build_argv(self.input_path, self.output_dir, settings, python)
        self.process: subprocess.Popen[str] | None = None
        self.stdout_lines: list[str] = []  # non-progress stdout (the CLI's summary), for logs
        self.stderr_lines: list[str] = []
        self._lock = threading.Lock()
        # Held from "has the child exited?" to the signal sent on that answer, and around every
        # reaping call: once reaped, the child's pid (= its process group id) may be reused.
        self._process_lock = threading.Lock()
        self._status = JobStatus(Stage.STARTING.value, 0, 0, False, None, None)
        self._readers: list[threading.Thread] = []
        self._existing: set[str] | None = None  # output_dir entries before start; None: folder absent
        self._cancelled = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        """Start the child (once). Raises DiffusionSegError when the interpreter cannot be started."""
        from DiffusionSegLib.core.errors import DiffusionSegError

        if self.process is not None:
            raise RuntimeError("this job was already started")
        if self._cancelled:
            raise RuntimeError("this job was cancelled; create a new SegmentJob to run again")
        self._existing = set(os.listdir(self.output_dir)) if self.output_dir.is_dir() else None
        kwargs: dict = {}
        if os.name == "nt":
            # Own process group, no console window popping up over Slicer.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            # Own session = own process group, so cancel can kill the child and everything it started.
            kwargs["start_new_session"] = True
        try:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1, env=child_env(), **kwargs)
        except OSError as err:
            raise DiffusionSegError(f"cannot start {self.argv[0]}: {err.strerror or err}") from err
        for stream, handler in ((self.process.stdout, self._on_stdout), (self.process.stderr, self._on_stderr)):
            thread = threading.Thread(target=_pump, args=(stream, handler), daemon=True,
                                      name=f"diffusionseg-{self.process.pid}-reader")
            thread.start()
            self._readers.append(thread)

    def poll(self) -> JobStatus:
        """Current status, without blocking (the child's exit is checked, never waited for)."""
        if self.process is not None and self._reap() is not None:
            self._collect()
        return self._snapshot()

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the child exits or ``timeout`` seconds pass (None: no limit); return the status then.

        Polls instead of blocking in ``Popen.wait`` so that a cancel from another thread is never
        held up behind it.
        """
        if self.process is None:
            raise RuntimeError("the job was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._reap() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return self._snapshot()
            time.sleep(_POLL_S)
        self._collect()
        return self._snapshot()

    def cancel(self) -> None:
        """Stop the child and its whole process tree and remove the outputs of this run.

        Safe in every state, and only the first call acts:

        - before :meth:`start`: nothing ran, nothing is removed; the job can no longer be started;
        - while the child runs: SIGTERM to its process group, SIGKILL after a grace period, each
          wait bounded (a child that still does not exit is reported later by :meth:`poll`);
        - after the child exited: nothing is signalled (its process group id may belong to
          another program by now); the child is reaped and its outputs removed (cancelling means
          the caller does not want them).
        """
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            self._status.stage = "cancelled"
            self._status.error = None
            if self.process is None:
                self._status.finished = True
                return
        assert self.process is not None
        if os.name == "nt":
            _stop_tree_windows(self.process, self._process_lock)
        else:
            _stop_tree_posix(self.process, self._process_lock)
        if self._reap() is not None:
            self._collect()
        else:
            log.warning("DiffusionSeg child %d did not exit after SIGKILL; removing its outputs anyway",
                        self.process.pid)
        self._remove_outputs()

    # -- internals -----------------------------------------------------------------------------

    def _on_stdout(self, line: str) -> None:
        if line.startswith(PROGRESS_PREFIX):
            try:
                event = json.loads(line[len(PROGRESS_PREFIX):])
                stage, done, total = str(event["stage"]), int(event["done"]), int(event["total"])
            except (ValueError, KeyError, TypeError):
                return  # a malformed line must not kill the reader thread
            with self._lock:
                if self._status.stage != "cancelled":
                    self._status.stage, self._status.done, self._status.total = stage, done, total
        elif line:
            with self._lock:
                self.stdout_lines.append(line)

    def _on_stderr(self, line: str) -> None:
        if line:
            with self._lock:
                self.stderr_lines.append(line)

    def _collect(self) -> None:
        """After the child exited: drain the pipes and fill returncode/error (idempotent)."""
        assert self.process is not None
        for thread in self._readers:
            thread.join(_READER_JOIN_S)
        returncode = self.process.returncode
        with self._lock:
            if self._status.finished:
                return
            self._status.finished = True
            self._status.returncode = returncode
            if returncode != 0 and not self._cancelled:
                self._status.error = _error_line(self.stderr_lines, returncode)

    def _reap(self) -> int | None:
        """The child's exit status, reaping it if it exited; None while it runs (never blocks)."""
        assert self.process is not None
        with self._process_lock:
            return self.process.poll()

    def _snapshot(self) -> JobStatus:
        with self._lock:
            return replace(self._status)

    def _remove_outputs(self) -> None:
        """Remove what appeared in output_dir since start (all of it when start created the folder)."""
        if self.process is None or not self.output_dir.is_dir():
            return
        if self._existing is None:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return
        for name in set(os.listdir(self.output_dir)) - self._existing:
            path = self.output_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def build_argv(input_path: Path, output_dir: Path, settings: SegmentSettings, python: str = sys.executable) -> list[str]:
    """Command line of the child for ``settings`` (see SegmentJob); the settings spell their own options."""
    return [python, "-m", "DiffusionSegLib", "segment", os.fspath(input_path), "-o", os.fspath(output_dir),
            "--progress", "json", *settings.to_argv()]


def child_env() -> dict[str, str]:
    """This process's environment with the library's parent folder first on PYTHONPATH."""
    env = dict(os.environ)
    paths = [os.fspath(LIBRARY_PARENT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are printed
    env["PYTHONIOENCODING"] = "utf-8"  # file names in messages; matches the pipes' decoding here
    return env


def _pump(stream: IO[str] | None, handler) -> None:
    """Feed each line of ``stream`` (without its newline) to ``handler`` until EOF."""
    if stream is None:
        return
    with stream:
        for line in stream:
            handler(line.rstrip("\r\n"))


def _error_line(stderr_lines: list[str], returncode: int | None) -> str:
    """The CLI's one-line error, else the last stderr line (a crash's exception), else the exit status."""
    for line in reversed(stderr_lines):
        if line.startswith(ERROR_PREFIX):
            return line
    for line in reversed(stderr_lines):
        if line.strip():
            return line.strip()
    if returncode is not None and returncode < 0:
        return f"the segmentation process was killed by signal {-returncode}"
    return f"the segmentation process failed with exit status {returncode}"


def _has_exited(process: subprocess.Popen) -> bool:
    """True when the child has exited, without reaping it where the OS allows (os.waitid WNOWAIT).

    An exited but unreaped child (a zombie) keeps its pid, so its process group id cannot have
    been reused yet. Without waitid, Popen.poll() answers and reaps.
    """
    if process.returncode is not None:
        return True
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped behind Popen's back: gone all the same
            return True
    return process.poll() is not None


def _wait_exited(process: subprocess.Popen, lock: threading.Lock, timeout: float) -> bool:
    """Poll until the child has exited (see _has_exited) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        with lock:
            if _has_exited(process):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def _stop_tree_posix(process: subprocess.Popen, lock: threading.Lock) -> None:
    """SIGTERM, then SIGKILL, to the child's process group (its pid: start_new_session), bounded waits.

    The group is signalled only while the child is not reaped, so the group id is still ours. The
    final SIGKILL also goes out when the child already obeyed SIGTERM (it is a zombie then): it
    takes grandchildren that ignore SIGTERM with it, which no later call could do safely.
    """
    with lock:
        if _has_exited(process):
            return  # exited on its own: nothing to signal; the caller reaps it
        _signal_group(process.pid, signal.SIGTERM)
    _wait_exited(process, lock, _TERM_GRACE_S)
    with lock:
        if process.returncode is None:  # not reaped (waitid polled without reaping, or still running)
            _signal_group(process.pid, signal.SIGKILL)
    _wait_exited(process, lock, _KILL_WAIT_S)


def _stop_tree_windows(process: subprocess.Popen, lock: threading.Lock) -> None:
    """taskkill /T /F the child's tree (it walks parent pids, so the child must still run), bounded."""
    with lock:
        if process.poll() is not None:
            return
    try:
        subprocess.run(["taskkill", "/PID", str(process.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                       check=False, timeout=_KILL_WAIT_S)
    except (OSError, subprocess.TimeoutExpired):
        pass  # the child itself is still killed below
    with lock:
        if process.poll() is None:
            process.kill()  # Popen holds a handle to the child, so its pid cannot have been reused
    _wait_exited(process, lock, _KILL_WAIT_S)


__all__ = ["JobStatus", "SegmentJob", "build_argv", "child_env", "PROGRESS_PREFIX", "LIBRARY_PARENT"]
