"""Progress shown by the commands: a tqdm bar for people, JSON lines for programs."""

from __future__ import annotations

import json
import sys

from DiffusionSegLib.cli.protocol import ESTIMATE_PREFIX, PROGRESS_PREFIX, WARNING_PREFIX
from DiffusionSegLib.core.enums import Stage


class Bar:
    """One tqdm bar on stderr that follows (done, total) events of one stage.

    ``unit`` names what is counted, so the bar's total is checkable: for sampling it is network
    evaluations (samples x steps x slices), as announced by the estimate and written in report.json.
    """

    def __init__(self, stage: str, desc: str, unit: str):
        self.stage, self.desc, self.unit = stage, desc, unit
        self.bar = None
        self.last: tuple[int, int] | None = None  # the last (done, total) shown: tests check the count

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=False, file=sys.stderr)
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        self.last = (int(self.bar.n), int(total))
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def sampling_bar(quiet: bool) -> Bar | None:
    """A progress callback drawing one tqdm bar for the sampling stage (stderr), counting network evaluations."""
    if quiet:
        return None
    return Bar(Stage.SAMPLING.value, "sampling", " network evaluations")


def print_warnings(warnings: list) -> None:
    """One stderr line per way the input does not fit the model (before sampling, whatever --progress)."""
    for warning in warnings:
        print(f"{WARNING_PREFIX}{warning.message}", file=sys.stderr, flush=True)


def print_estimate(estimate) -> None:
    print(f"{ESTIMATE_PREFIX}sampling will take {estimate.text()}", file=sys.stderr, flush=True)


def json_progress(stage: str, done: int, total: int) -> None:
    """Print one progress event as ``DIFFUSIONSEG_PROGRESS {"stage": ..., "done": ..., "total": ...}``.

    Flushed at once: the reader is another process waiting on a pipe, which Python block-buffers.
    """
    event = json.dumps({"stage": str(stage), "done": int(done), "total": int(total)})
    print(PROGRESS_PREFIX + event, flush=True)
