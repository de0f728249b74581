"""background.SegmentJob: the real CLI in a child process; progress, errors, cancel of the whole tree."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import REPO
from DiffusionSegLib.pipeline.settings import SegmentSettings
from DiffusionSegLib.slicer.job import SegmentJob, build_argv

SAMPLE = REPO / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz"


def small_image(path: Path) -> Path:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(20, 24)).astype(np.float32))
    sitk.WriteImage(image, str(path))
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_argv_carries_the_settings(tmp_path):
    argv = build_argv(tmp_path / "in.nrrd", tmp_path / "out",
                      SegmentSettings(model="m", samples=4, steps=7, seed=3, device="cpu", crf=False,
                                      keep_samples=True), "py")
    assert argv[:4] == ["py", "-m", "DiffusionSegLib", "segment"]
    joined = " ".join(argv)
    for part in ("--progress json", "--keep-samples", "--model m", "--samples 4", "--steps 7", "--seed 3",
                 "--device cpu", "--no-crf"):
        assert part in joined, part
    with_crf = build_argv(tmp_path / "in.nrrd", tmp_path / "out", SegmentSettings(crf=True), "py")
    card_default = build_argv(tmp_path / "in.nrrd", tmp_path / "out", SegmentSettings(), "py")
    assert "--crf" in with_crf and "--no-crf" not in with_crf
    assert "--crf" not in card_default and "--no-crf" not in card_default  # the model card decides


def test_a_run_reports_progress_and_writes_its_outputs(tmp_path, tiny_model):
    src = small_image(tmp_path / "in.nrrd")
    job = SegmentJob(src, tmp_path / "out", SegmentSettings(model=str(tiny_model), samples=2, steps=2, crf=False,
                                                       keep_samples=True))
    job.start()
    status = job.wait(timeout=180)
    assert status.succeeded, (status, job.stderr_lines[-5:])
    assert (status.stage, status.done, status.total) == ("write", 1, 1)  # the last event
    assert (tmp_path / "out" / "report.json").is_file()
    assert len(list((tmp_path / "out" / "samples").glob("sample_*.nii.gz"))) == 2
    assert any("outputs in" in line or str(tmp_path / "out") in line for line in job.stdout_lines)


def test_a_user_error_comes_back_as_its_one_line_message(tmp_path):
    job = SegmentJob(tmp_path / "missing.nii.gz", tmp_path / "out", SegmentSettings())
    job.start()
    status = job.wait(timeout=120)
    assert status.finished and status.returncode == 2 and not status.succeeded
    assert status.error.startswith("diffusionseg: error: ") and "missing.nii.gz" in status.error
    assert not (tmp_path / "out").exists()


def test_a_child_that_cannot_start_is_a_clear_error(tmp_path):
    from DiffusionSegLib.core.errors import DiffusionSegError

    job = SegmentJob(tmp_path / "in.nrrd", tmp_path / "out", SegmentSettings(), python=str(tmp_path / "no-python"))
    with pytest.raises(DiffusionSegError, match="cannot start"):
        job.start()


@pytest.mark.skipif(os.name == "nt", reason="uses a POSIX shell wrapper to spawn a grandchild")
def test_cancel_kills_the_whole_process_tree_and_removes_partial_outputs(tmp_path):
    # The "interpreter" is a wrapper that first starts a grandchild (like a worker process would),
    # then runs the real CLI on the sample volume with a long chain, so the run is surely cut.
    marker = tmp_path / "grandchild.pid"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > '{marker}'\nexec '{sys.executable}' \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    out.mkdir()
    # An earlier run's outputs (the CLI refuses a folder with files that are not): they must stay.
    earlier = {"report.json": '{"outputs": ["fused.nii.gz", "report.json"]}', "fused.nii.gz": "earlier run"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    job = SegmentJob(SAMPLE, out, SegmentSettings(samples=5, steps=50, device="cpu"), python=str(wrapper))
    job.start()
    deadline = time.monotonic() + 120
    while job.poll().stage != "sampling":
        assert time.monotonic() < deadline, ("never reached sampling", job.stderr_lines[-5:])
        assert not job.poll().finished, job.stderr_lines[-5:]
        time.sleep(0.1)
    grandchild = int(marker.read_text())
    assert alive(job.pid) and alive(grandchild)

    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 10
    status = job.poll()
    assert status.stage == "cancelled" and status.finished and status.error is None
    time.sleep(0.2)
    assert not alive(job.pid) and not alive(grandchild)
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier, "partial outputs go, earlier outputs stay"


# --- cancel in every state (issue item 9) -----------------------------------------------------------

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX process groups and shell wrappers")


def fake_python(tmp_path: Path, body: str) -> str:
    """A shell script standing in for the interpreter (it ignores the CLI arguments it is given)."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def started_sleeper(tmp_path: Path) -> SegmentJob:
    """A running job whose child (a fake interpreter) sleeps for 10 minutes unless signalled."""
    job = SegmentJob(tmp_path / "in.nrrd", tmp_path / "out", SegmentSettings(), python=fake_python(tmp_path, "exec sleep 600"))
    job.start()
    wait_until(lambda: alive(job.pid))
    return job


@pytest.fixture()
def signals_sent(monkeypatch):
    """Record every os.killpg / os.kill call that sends a signal (they still go out); signal 0, the
    existence check of ``alive``, is not a signal."""
    sent: list[tuple[str, int, int]] = []
    real_killpg, real_kill = os.killpg, os.kill

    def killpg(pgid: int, sig: int) -> None:
        sent.append(("killpg", pgid, sig))
        real_killpg(pgid, sig)

    def kill(pid: int, sig: int) -> None:
        if sig != 0:
            sent.append(("kill", pid, sig))
        real_kill(pid, sig)

    monkeypatch.setattr(os, "killpg", killpg)
    monkeypatch.setattr(os, "kill", kill)
    return sent


def test_cancel_before_start_touches_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's file")
    job = SegmentJob(tmp_path / "in.nrrd", out, SegmentSettings())
    job.cancel()
    job.cancel()
    assert (out / "mine.txt").read_text() == "the user's file", "a job that never ran removes nothing"
    status = job.poll()
    assert status.stage == "cancelled" and status.finished and status.returncode is None and status.error is None
    with pytest.raises(RuntimeError, match="cancelled"):
        job.start()
    assert job.process is None


@posix_only
def test_cancel_after_the_child_exited_signals_nothing(tmp_path, signals_sent):
    # The child's pid (= its process group id) is free for reuse once the child is reaped: a signal
    # to that group could hit unrelated processes. After exit, cancel only reaps and cleans up.
    job = SegmentJob(tmp_path / "in.nrrd", tmp_path / "out", SegmentSettings(), python=fake_python(tmp_path, "exit 0"))
    job.start()
    wait_until(lambda: not alive(job.pid))  # exited (a zombie), not yet reaped: poll() was never called
    job.cancel()
    job.cancel()
    assert signals_sent == []
    status = job.poll()
    assert status.stage == "cancelled" and status.finished and status.returncode == 0
    assert job.process.returncode == 0, "the child is reaped"

    finished = SegmentJob(tmp_path / "in.nrrd", tmp_path / "out2", SegmentSettings(), python=fake_python(tmp_path, "exit 3"))
    finished.start()
    assert finished.wait(timeout=10).finished  # exited and reaped by wait()
    finished.cancel()
    assert signals_sent == []


@posix_only
def test_cancel_twice_during_a_run_signals_once(tmp_path, signals_sent):
    job = started_sleeper(tmp_path)
    job.cancel()
    sent = list(signals_sent)
    assert sent and all(call[1] == job.pid for call in sent)
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 1.0
    assert signals_sent == sent, "the second cancel must not signal again"
    assert not alive(job.pid) and job.poll().stage == "cancelled"


@posix_only
def test_cancel_asks_with_sigterm_then_kills_a_tree_that_ignores_it(tmp_path, signals_sent, monkeypatch):
    import signal

    from DiffusionSegLib.slicer import job as background

    monkeypatch.setattr(background, "_TERM_GRACE_S", 0.5, raising=False)
    marker = tmp_path / "grandchild.pid"
    body = f"trap '' TERM\nsleep 600 &\necho $! > '{marker}'\nexec sleep 600"
    job = SegmentJob(tmp_path / "in.nrrd", tmp_path / "out", SegmentSettings(), python=fake_python(tmp_path, body))
    job.start()
    wait_until(marker.exists)
    wait_until(lambda: marker.read_text().strip() != "")
    grandchild = int(marker.read_text())
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 5
    assert [sig for how, _, sig in signals_sent if how == "killpg"][:2] == [signal.SIGTERM, signal.SIGKILL]
    time.sleep(0.2)
    assert not alive(job.pid) and not alive(grandchild)
    assert job.poll().finished


@posix_only
@pytest.mark.skipif(not hasattr(os, "waitid"), reason="needs os.waitid(WNOWAIT)")
def test_a_grandchild_ignoring_sigterm_dies_with_a_child_that_obeys_it(tmp_path):
    # The child exits at once on SIGTERM; its group is swept with SIGKILL before the child is reaped
    # (while its pid, the group id, cannot have been reused).
    marker = tmp_path / "grandchild.pid"
    body = f"(trap '' TERM; exec sleep 600) &\necho $! > '{marker}'\nexec sleep 600"
    job = SegmentJob(tmp_path / "in.nrrd", tmp_path / "out", SegmentSettings(), python=fake_python(tmp_path, body))
    job.start()
    wait_until(lambda: marker.exists() and marker.read_text().strip() != "")
    grandchild = int(marker.read_text())
    job.cancel()
    time.sleep(0.2)
    assert not alive(job.pid) and not alive(grandchild)


@posix_only
def test_cancel_never_blocks_on_a_child_that_does_not_die(tmp_path, monkeypatch):
    import signal
    import threading

    from DiffusionSegLib.slicer import job as background

    job = started_sleeper(tmp_path)
    real_killpg = os.killpg
    try:
        # Signals that never arrive (a process stuck in the kernel looks the same to the parent).
        monkeypatch.setattr(os, "killpg", lambda pgid, sig: None)
        monkeypatch.setattr(os, "kill", lambda pid, sig: None)
        monkeypatch.setattr(background, "_TERM_GRACE_S", 0.3, raising=False)
        monkeypatch.setattr(background, "_KILL_WAIT_S", 0.3, raising=False)
        canceller = threading.Thread(target=job.cancel, daemon=True)
        canceller.start()
        canceller.join(10)
        hung = canceller.is_alive()
        status = job.poll()
    finally:
        monkeypatch.undo()
        real_killpg(job.pid, signal.SIGKILL)
        canceller.join(10)
    assert not hung, "cancel must give up after bounded waits"
    assert status.stage == "cancelled" and not status.finished  # the child outlived the cancel
