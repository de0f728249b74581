"""Seconds and peak memory of `diffusionseg segment` against the number of slices of a CT.

    python scripts/measure_memory.py CT.nii.gz --slices 20,50,100 [--samples 5 --steps 5] [--model M]

Builds CTs of each slice count from CT (its slices repeated along z, every other copy mirrored so the
anatomy joins up; geometry kept), runs the CLI on each in its own process, and prints one JSON line
per size: peak resident memory of that process (which includes writing the outputs), `total_s` and
the stage timings of its report.json, and the memory per slice between consecutive sizes.
Linux and macOS (peak from getrusage of the child process).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Runs the CLI as a child and prints the child's peak resident set (kB on Linux, bytes on macOS).
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def stacked(ct: sitk.Image, slices: int) -> sitk.Image:
    """``ct`` repeated along z (every other copy mirrored) and cut to ``slices`` slices."""
    array = sitk.GetArrayFromImage(ct)
    copies, flip = [], False
    while sum(len(c) for c in copies) < slices:
        copies.append(array[::-1] if flip else array)
        flip = not flip
    out = sitk.GetImageFromArray(np.concatenate(copies)[:slices])
    out.SetSpacing(ct.GetSpacing())
    out.SetOrigin(ct.GetOrigin())
    out.SetDirection(ct.GetDirection())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ct", help="a 3D CT any SimpleITK reader opens")
    parser.add_argument("--slices", default="20,50,100", help="comma-separated slice counts")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    ct = sitk.ReadImage(args.ct)
    unit_mb = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    previous = None
    with tempfile.TemporaryDirectory(prefix="diffusionseg-memory-") as tmp:
        for slices in (int(s) for s in args.slices.split(",")):
            path, out = Path(tmp) / f"ct_{slices}.nii.gz", Path(tmp) / f"out_{slices}"
            sitk.WriteImage(stacked(ct, slices), str(path))
            command = [sys.executable, "-m", "DiffusionSegLib", "segment", str(path), "-o", str(out), "-q"]
            for flag, value in (("--samples", args.samples), ("--steps", args.steps), ("--model", args.model)):
                if value is not None:
                    command += [flag, str(value)]
            run = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"segment failed on {slices} slices: {run.stderr.strip()[-500:]}")
            peak_mb = int(run.stdout.strip().splitlines()[-1]) * unit_mb
            report = json.loads((out / "report.json").read_text())
            row = {"slices": slices, "size": list(reversed(sitk.ReadImage(str(path)).GetSize())),
                   "peak_mb": round(peak_mb), "total_s": report["total_s"], "timings_s": report["timings_s"]}
            if previous is not None:
                row["mb_per_slice"] = round((peak_mb - previous[1]) / (slices - previous[0]), 1)
            previous = (slices, peak_mb)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
