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

from conftest import REPO
from DiffusionSegLib.background import PROGRESS_PREFIX, SegmentJob, build_argv
from DiffusionSegLib.cli import PROGRESS_PREFIX as CLI_PREFIX
from DiffusionSegLib.slicer_workflow import RunSettings

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


def test_progress_prefix_is_the_clis():
    assert PROGRESS_PREFIX == CLI_PREFIX


def test_argv_carries_the_settings(tmp_path):
    argv = build_argv(tmp_path / "in.nrrd", tmp_path / "out",
                      RunSettings(python="py", model="m", samples=4, steps=7, seed=3, device="cpu", crf=False))
    assert argv[:4] == ["py", "-m", "DiffusionSegLib", "segment"]
    joined = " ".join(argv)
    for part in ("--progress json", "--keep-samples", "--model m", "--samples 4", "--steps 7", "--seed 3",
                 "--device cpu", "--no-crf"):
        assert part in joined, part


def test_a_run_reports_progress_and_writes_its_outputs(tmp_path, tiny_model):
    src = small_image(tmp_path / "in.nrrd")
    job = SegmentJob(src, tmp_path / "out", RunSettings(model=str(tiny_model), samples=2, steps=2, crf=False))
    job.start()
    status = job.wait(timeout=180)
    assert status.succeeded, (status, job.stderr_lines[-5:])
    assert (status.stage, status.done, status.total) == ("write", 1, 1)  # the last event
    assert (tmp_path / "out" / "report.json").is_file()
    assert len(list((tmp_path / "out" / "samples").glob("sample_*.nii.gz"))) == 2
    assert any("outputs in" in line or str(tmp_path / "out") in line for line in job.stdout_lines)


def test_a_user_error_comes_back_as_its_one_line_message(tmp_path):
    job = SegmentJob(tmp_path / "missing.nii.gz", tmp_path / "out", RunSettings())
    job.start()
    status = job.wait(timeout=120)
    assert status.finished and status.returncode == 2 and not status.succeeded
    assert status.error.startswith("diffusionseg: error: ") and "missing.nii.gz" in status.error
    assert not (tmp_path / "out").exists()


def test_a_child_that_cannot_start_is_a_clear_error(tmp_path):
    from DiffusionSegLib.errors import DiffusionSegError

    job = SegmentJob(tmp_path / "in.nrrd", tmp_path / "out", RunSettings(python=str(tmp_path / "no-python")))
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
    (out / "mine.txt").write_text("the user's file")
    job = SegmentJob(SAMPLE, out, RunSettings(python=str(wrapper), samples=5, steps=50, device="cpu"))
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
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"], "partial outputs must go, the user's file stays"
