"""scripts/compare_checkouts.py: the same checkout twice gives identical outputs and a ratio near 1."""

import json
import subprocess
import sys

from helpers import REPO


def test_one_checkout_against_itself_gives_identical_masks():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_checkouts.py"), str(REPO), str(REPO),
                           "--pairs", "1", "--samples", "2", "--steps", "1", "--compare-samples"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    runs, summary = lines[:-1], lines[-1]
    assert [r["checkout"] for r in runs] == ["before", "after"]
    assert all(r["seconds"] > 0 and "sampling" in r["timings_s"] for r in runs)
    assert summary["identical_fused"] and summary["identical_samples"] and summary["fused_dice"] == 1.0
    assert summary["ambiguity_voxels"]["before"] == summary["ambiguity_voxels"]["after"] > 0
