"""Real-data benchmark plumbing (DiffusionSegLib.bench.real) on tiny synthetic data: aggregation
(mean +/- std over seeds, checked by hand), uncertainty statistics, resume skipping finished runs,
the CLI flags, and the model catalogue against the bundled files."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.bench import real as benchreal

from DiffusionSegLib.models import catalogue
from DiffusionSegLib.core.errors import DiffusionSegError


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Aggregation and statistics, by hand
# ---------------------------------------------------------------------------------------------


def _fake_metrics(dice_by_case: dict[str, float], hd: float | None = 5.0) -> dict:
    return {"cases": [{"case": c, "metrics": {"liver": {"dice": d, "iou": d / (2 - d), "hd95_mm": hd}}}
                      for c, d in dice_by_case.items()]}


def test_aggregate_mean_and_sample_std_over_seeds_by_hand():
    runs = [benchreal.RunSpec(f"m_s{s}", "medsegdiff", "MedSegDiff", s, benchreal.medsegdiff_network) for s in range(3)]
    runs.append(benchreal.RunSpec("u_s0", "unet", "UNet (supervised)", 0, benchreal.unet_network))
    metrics = {"m_s0": _fake_metrics({"a": 0.8, "b": 0.6}), "m_s1": _fake_metrics({"a": 0.7, "b": 0.5}),
               "m_s2": _fake_metrics({"a": 0.9, "b": 0.4}, hd=None), "u_s0": _fake_metrics({"a": 0.5, "b": 0.5})}
    agg = benchreal.aggregate(metrics, runs)
    cell = agg["MedSegDiff"]["per_case"]["a"]["liver"]["dice"]
    assert cell["mean"] == pytest.approx(0.8) and cell["n"] == 3
    # sample std (n - 1): deviations -0.0, -0.1, +0.1 -> sqrt(0.02 / 2) = 0.1
    assert cell["std"] == pytest.approx(0.1)
    # per-seed means over cases: 0.7, 0.6, 0.65 -> mean 0.65, std sqrt((0.0025 + 0.0025 + 0) / 2) = 0.05
    mean_cell = agg["MedSegDiff"]["case_mean"]["liver"]["dice"]
    assert mean_cell["mean"] == pytest.approx(0.65) and mean_cell["std"] == pytest.approx(0.05)
    hd = agg["MedSegDiff"]["per_case"]["b"]["liver"]["hd95_mm"]
    assert hd["mean"] == pytest.approx(5.0) and hd["n"] == 2  # the undefined HD95 is left out, and counted
    single = agg["UNet (supervised)"]["per_case"]["a"]["liver"]["dice"]
    assert single == {"mean": 0.5, "std": 0.0, "n": 1}
    table = benchreal.accuracy_table("organs", agg)
    assert "| MedSegDiff | 0,1,2 | a | liver | 0.800 ± 0.100 |" in table
    assert "| UNet (supervised) | 0 | a | liver | 0.500 |" in table
    assert "5.0 ± 0.0 (n=2)" in table  # HD95 defined for 2 of the 3 seeds


def test_aggregate_leaves_out_missing_runs():
    runs = [benchreal.RunSpec(f"m_s{s}", "medsegdiff", "MedSegDiff", s, benchreal.medsegdiff_network) for s in range(3)]
    agg = benchreal.aggregate({"m_s1": _fake_metrics({"a": 0.7})}, runs)
    assert agg["MedSegDiff"]["seeds"] == [1]
    assert agg["MedSegDiff"]["per_case"]["a"]["liver"]["dice"]["n"] == 1


def test_uncertainty_stats_by_hand():
    ref = np.zeros((2, 4, 4), bool)
    ref[0, 0, :2] = True  # 2 voxels
    samples = np.zeros((3, 2, 4, 4), bool)
    samples[:, 0, 0, 0] = True  # all 3 samples: agreed foreground, correct
    samples[0, 0, 0, 1] = True  # 1 of 3: fused says background, reference foreground -> wrong, ambiguous
    samples[:2, 1, 3, 3] = True  # 2 of 3: fused foreground, reference background -> wrong, ambiguous
    samples[:, 1, 2, 2] = True  # all 3: fused foreground, wrong, not ambiguous
    u = benchreal.uncertainty_stats(samples, ref)
    assert u["wrong_voxels"] == 3 and u["wrong_in_ambiguity"] == 2
    assert u["ambiguity_voxels"] == 2 and u["fused_voxels"] == 3 and u["reference_voxels"] == 2
    assert u["reliability"]["voxels"] == [32 - 4, 1, 1, 2]
    assert u["reliability"]["foreground"] == [0, 1, 0, 1]
    assert [s[0] for s in u["slices"]] == [0, 1]
    assert u["slices"][0][1] == pytest.approx(2 * 1 / 3)  # slice 0: fused {(0,0)} vs ref {(0,0),(0,1)}
    assert u["slices"][1][1] == 0.0


def test_uncertainty_summary_pools_runs_and_ranks():
    def run(div, dice):
        rel = {"k": [0, 1, 2], "voxels": [10, 2, 4], "foreground": [0, 1, 4]}
        return {"cases": [{"case": "c", "metrics": {"x": {"dice": dice}}, "uncertainty": {"x": {
            "wrong_voxels": 4, "wrong_in_ambiguity": 1, "ambiguity_voxels": 2, "fused_voxels": 8,
            "diversity": div, "reliability": rel, "slices": [[0, dice, div]]}}}]}
    metrics = {"a": run(0.1, 0.9), "b": run(0.2, 0.8), "c": run(0.3, 0.5)}
    s = benchreal.uncertainty_summary(metrics, ["a", "b", "c", "missing"])
    assert s["fraction_wrong_in_ambiguity"] == pytest.approx(3 / 12)
    assert s["ambiguity_to_fused"] == pytest.approx(6 / 24)
    assert s["spearman_case"] == pytest.approx(-1.0) and s["n_case"] == 3 and s["n_slice"] == 3
    assert s["reliability"]["observed"] == pytest.approx([0.0, 0.5, 1.0])
    # ECE = (30 * 0 + 6 * |0.5 - 0.5| + 12 * 0) / 48
    assert s["ece"] == pytest.approx(0.0)
    assert benchreal.spearman([1, 2], [2, 1]) is None


def test_mean_std_ignores_none():
    assert benchreal.mean_std([None, 1.0, 3.0]) == (2.0, statistics.stdev([1.0, 3.0]), 2)
    assert benchreal.mean_std([None]) == (None, None, 0)


# ---------------------------------------------------------------------------------------------
# The suite on a tiny synthetic dataset: runs, results, resume
# ---------------------------------------------------------------------------------------------


def _volume(rng, slices=4, size=32):
    zz, yy, xx = np.mgrid[:slices, :size, :size]
    cy, cx = rng.uniform(10, 22, 2)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 36).astype(np.uint8)
    image = (rng.normal(0, 20, mask.shape) + 100 * mask).astype(np.float32)
    return image, mask


def _write_tiny_dataset(root):
    rng = np.random.default_rng(0)
    entries = {"training": [], "test": []}
    for split, n, images, labels in (("training", 2, "imagesTr", "labelsTr"), ("test", 1, "imagesTs", "labelsTs")):
        (root / images).mkdir(parents=True, exist_ok=True)
        (root / labels).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask = _volume(rng)
            name = f"{split}{i}"
            for array, folder in ((image, images), (mask, labels)):
                img = sitk.GetImageFromArray(array)
                img.SetSpacing((3.0, 3.0, 3.0))
                sitk.WriteImage(img, str(root / folder / f"{name}.nii.gz"))
            entries[split].append({"image": f"./{images}/{name}.nii.gz", "label": f"./{labels}/{name}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "blob"}, **entries}))


TINY_BUDGET = benchreal.Budget(steps=2, batch_size=2, patch=32, channels=(4, 8), eval_samples=2, eval_steps=2)
TINY_RUNS = (benchreal.RunSpec("medsegdiff_s0", "medsegdiff", "MedSegDiff", 0, benchreal.medsegdiff_network),
             benchreal.RunSpec("unet_s0", "unet", "UNet (supervised)", 0, benchreal.unet_network))


def test_suite_runs_writes_results_and_resume_skips_finished_runs(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_tiny_dataset(data / "tiny")
    task = benchreal.Task("tiny", "tiny", (3.0, 3.0), {"kind": "zscore"}, "synthetic blobs")
    out = tmp_path / "out"
    kwargs = dict(tasks=[task], runs=TINY_RUNS, budget=TINY_BUDGET, prepare=False, extras=False)
    results = benchreal.run_suite(data, out, **kwargs)
    assert results["tasks"]["tiny"]["finished_runs"] == ["medsegdiff_s0", "unet_s0"]
    assert results["tasks"]["tiny"]["missing_runs"] == []
    m = json.loads((out / "runs" / "tiny" / "medsegdiff_s0" / "metrics.json").read_text())
    assert m["samples"] == 2 and m["steps"] == 2 and m["training"]["steps"] == 2
    assert [c["case"] for c in m["cases"]] == ["test0"]  # only the test split is scored
    assert set(m["cases"][0]["metrics"]["blob"]) == {"dice", "iou", "precision", "recall", "hd95_mm"}
    agg = results["tasks"]["tiny"]["aggregate"]
    assert agg["MedSegDiff"]["per_case"]["test0"]["blob"]["dice"]["mean"] == pytest.approx(
        m["cases"][0]["metrics"]["blob"]["dice"])
    assert "| MedSegDiff |" in (out / "tables.md").read_text()

    # Without --resume an existing suite is refused (never silently mixed).
    with pytest.raises(DiffusionSegError, match="--resume"):
        benchreal.run_suite(data, out, **kwargs)

    # With --resume: the finished runs are skipped (neither trained nor evaluated again); a run whose
    # metrics were lost is evaluated again from its trained model without retraining.
    (out / "runs" / "tiny" / "unet_s0" / "metrics.json").unlink()
    trained, evaluated = [], []
    import DiffusionSegLib.training.loop as training

    real_eval = benchreal.evaluate_model
    monkeypatch.setattr(training, "train", lambda *a, **k: trained.append(a) or None)
    monkeypatch.setattr(benchreal, "evaluate_model", lambda *a, **k: evaluated.append(a[0]) or real_eval(*a, **k))
    again = benchreal.run_suite(data, out, resume=True, **kwargs)
    assert trained == []
    assert [p.parent.name for p in evaluated] == ["unet_s0"]
    assert again["tasks"]["tiny"]["finished_runs"] == ["medsegdiff_s0", "unet_s0"]
    assert "finished earlier, skipped" in (out / "log.txt").read_text()

    # A changed budget in the same folder is refused.
    with pytest.raises(DiffusionSegError, match="another budget"):
        benchreal.run_suite(data, out, resume=True, **{**kwargs, "budget": benchreal.Budget(steps=3)})


def test_full_suite_shares_one_budget_across_methods():
    seen = {}
    for task in benchreal.TASKS:
        for run in benchreal.RUNS:
            c = benchreal.train_config(task, run, benchreal.FULL)
            key = (task.name, c.steps, c.batch_size, tuple(c.patch_size), c.augment, tuple(c.spacing),
                   json.dumps(c.normalization), c.val_cases, c.foreground_fraction)
            seen.setdefault(task.name, set()).add(key)
            # One shared lr; the only exception is the UNet's own-lr variant, named as such.
            assert c.lr == benchreal.FULL.lr or (run.method == "unet" and "lr 3e-3" in run.variant and c.lr == 3e-3)
            assert list(c.network["channels"]) == list(benchreal.FULL.channels)
    assert all(len(v) == 1 for v in seen.values())
    counts = {}
    for run in benchreal.RUNS:
        counts[run.variant] = counts.get(run.variant, 0) + 1
    assert counts["MedSegDiff"] == 3 and counts["UNet (supervised)"] == 3
    assert counts["Vanilla conditional DPM"] == counts["MedSegDiff w/o FF-Parser"] == 1
    assert counts["MedSegDiff w/o dynamic conditioning"] == 1
    nodyn = next(r for r in benchreal.RUNS if r.key == "medsegdiff_nodyn_s0")
    assert benchreal.network_kwargs(nodyn, benchreal.FULL)["dynamic_conditioning"] is False


# The network kwargs of every run at both budgets, as the suite computed them when it branched on the
# method name (before each RunSpec carried its own network settings): results stay comparable.
_MSD_FULL = {"channels": [16, 32, 64, 128], "num_res_blocks": 1, "norm_groups": 8, "ff_reference_size": 64}
_MSD_QUICK = {"channels": [8, 8, 16, 16], "num_res_blocks": 1, "norm_groups": 8, "ff_reference_size": 64}
_DPM_FULL = {"channels": [16, 32, 64, 128], "num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 8}
_DPM_QUICK = {"channels": [8, 8, 16, 16], "num_res_blocks": 1, "num_head_channels": 8, "norm_num_groups": 8}
_UNET_FULL = {"channels": [16, 32, 64, 128], "num_res_units": 2}
_UNET_QUICK = {"channels": [8, 8, 16, 16], "num_res_units": 2}
_NODYN, _NOFF = {"dynamic_conditioning": False}, {"ff_parser": False}
EXPECTED_NETWORKS = {
    "FULL": {"medsegdiff_s0": _MSD_FULL, "medsegdiff_s1": _MSD_FULL, "medsegdiff_s2": _MSD_FULL,
             "medsegdiff_nodyn_s0": {**_MSD_FULL, **_NODYN}, "medsegdiff_noff_s0": {**_MSD_FULL, **_NOFF},
             "vanilla_dpm_s0": _DPM_FULL,
             **{f"unet{lr}_s{s}": _UNET_FULL for lr in ("", "_lr3e-3") for s in range(3)}},
    "QUICK": {"medsegdiff_s0": _MSD_QUICK, "medsegdiff_s1": _MSD_QUICK, "medsegdiff_s2": _MSD_QUICK,
              "medsegdiff_nodyn_s0": {**_MSD_QUICK, **_NODYN}, "medsegdiff_noff_s0": {**_MSD_QUICK, **_NOFF},
              "vanilla_dpm_s0": _DPM_QUICK,
              **{f"unet{lr}_s{s}": _UNET_QUICK for lr in ("", "_lr3e-3") for s in range(3)}},
}


@pytest.mark.parametrize("budget_name", ["FULL", "QUICK"])
def test_network_kwargs_of_every_run_are_pinned(budget_name):
    budget = getattr(benchreal, budget_name)
    expected = EXPECTED_NETWORKS[budget_name]
    assert sorted(r.key for r in benchreal.RUNS) == sorted(expected)
    for task in benchreal.TASKS:
        for run in benchreal.RUNS:
            network = benchreal.train_config(task, run, budget).network
            assert network == expected[run.key], run.key
            # Same key order too: metrics.json and the model cards write the dict as it is.
            assert list(network) == list(expected[run.key]), run.key
    # Each call builds fresh lists: a run cannot change another run's (or the next call's) channels.
    first = benchreal.network_kwargs(benchreal.RUNS[0], budget)
    first["channels"].append(1)
    assert benchreal.network_kwargs(benchreal.RUNS[0], budget) == expected[benchreal.RUNS[0].key]


def test_suite_json_names_each_runs_network_settings():
    record = benchreal.RUNS[3].record()
    assert record["network"] == "medsegdiff_network" and record["network_overrides"] == _NODYN
    json.dumps([r.record() for r in benchreal.RUNS])  # JSON-ready


def test_measure_step_times_times_the_public_train(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_tiny_dataset(data / "tiny")
    task = benchreal.Task("tiny", "tiny", (3.0, 3.0), {"kind": "zscore"}, "synthetic blobs")
    import DiffusionSegLib.training.loop as training

    calls, real_train = [], training.train

    def spy(dataset, model_dir, config, progress=True, resume=False):
        calls.append((config.steps, config.checkpoint_every, resume))
        return real_train(dataset, model_dir, config, progress=progress, resume=resume)

    monkeypatch.setattr(training, "train", spy)
    rows = benchreal.measure_step_times(data, TINY_BUDGET, steps=2, tasks=[task], runs=TINY_RUNS)
    assert [(r["task"], r["run"]) for r in rows] == [("tiny", "medsegdiff_s0"), ("tiny", "unet_s0")]
    assert all(r["seconds_per_step"] >= 0.0 for r in rows)
    # One warm-up step, then the timed steps resumed from its checkpoint, with no checkpoint among them.
    assert calls == [(1, 3, False), (3, 3, True)] * 2
    assert [p.name for p in data.iterdir()] == ["tiny"]  # nothing written next to the data


def test_cli_parses_the_real_suite_flags():
    from DiffusionSegLib.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--suite", "real", "--quick", "--data", "d", "--out", "o", "--resume"])
    assert (args.suite, args.quick, args.data, args.out, args.resume) == ("real", True, "d", "o", True)
    assert build_parser().parse_args(["bench"]).suite == "inference"
    assert build_parser().parse_args(["bench", "--suite", "real", "--measure-steps"]).measure_steps


# ---------------------------------------------------------------------------------------------
# Model catalogue
# ---------------------------------------------------------------------------------------------


def test_catalogue_matches_the_bundled_weights():
    entries = catalogue.catalogue()
    assert entries, "Resources/Models.json lists no model"
    assert catalogue.check_bundled() == []
    from DiffusionSegLib.models.store import BUNDLED_DIR

    bundled = {p.name for p in BUNDLED_DIR.iterdir() if (p / "model.json").is_file()}
    assert bundled <= {e["name"] for e in entries}  # every bundled model is catalogued
    for entry in entries:
        card = json.loads((catalogue.RESOURCES / entry["path"] / "model.json").read_text())
        assert card["weights_sha256"] == entry["weights_sha256"]
        shown = card.get("shown_labels") or [lab["name"] for lab in card["labels"]]
        assert [lab["name"] for lab in card["labels"] if lab["name"] in shown] == entry["labels"]


def test_catalogue_check_reports_a_wrong_digest_and_a_missing_url(tmp_path):
    from DiffusionSegLib.core.errors import ModelLoadError

    entry = dict(catalogue.catalogue()[0])
    entry["weights_sha256"] = "0" * 64
    path = tmp_path / "Models.json"
    path.write_text(json.dumps({"format_version": 1, "models": [entry]}))
    assert any("sha256" in p for p in catalogue.check_bundled(path))
    bad = {k: v for k, v in entry.items() if k != "path"}
    bad["source"] = "download"
    path.write_text(json.dumps({"format_version": 1, "models": [bad]}))
    with pytest.raises(ModelLoadError, match="url"):
        catalogue.catalogue(path)
    assert catalogue.catalogue(tmp_path / "absent.json") == []
