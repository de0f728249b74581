"""The CLI end to end: the bundled sample with the bundled model, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from helpers import REPO
from DiffusionSegLib.cli.main import main
from DiffusionSegLib.models.store import DEFAULT_MODEL, resolve_model

SAMPLE = REPO / "Resources" / "Sample" / "ct_abdomen_sample.nii.gz"


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_segment_the_bundled_sample_with_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "sample"
    assert run_cli("segment", SAMPLE, "-o", out, "--samples", "2", "--steps", "3", "-q") == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    reference = sitk.ReadImage(str(SAMPLE))
    for name in ("fused", "consistency", "ambiguity", "probability_liver", "uncertainty_spleen"):
        assert_same_grid(sitk.ReadImage(str(out / f"{name}.nii.gz")), reference)
    assert not (out / "crf.nii.gz").exists()  # the bundled card turns DenseCRF off (decided on validation)
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["name"] == DEFAULT_MODEL
    assert report["samples"] == 2 and report["steps"] == 3 and report["nfe_per_image"] == 6
    # Per-label figures keyed by label name first, the same way for volumes and diversity.
    shown = {"liver", "spleen", "kidney_right", "kidney_left", "stomach", "gallbladder", "aorta",
             "inferior_vena_cava", "vertebrae"}  # context classes (portal vein, lung) are not output
    assert set(report["volumes_ml"]) == set(report["sample_diversity"]) == shown
    assert set(report["volumes_ml"]["liver"]) == {"fused", "consistency", "ambiguity"}
    assert report["postprocessing"]["largest_component"][:2] == ["liver", "spleen"]
    assert report["warnings"] == [], "the bundled sample fits the bundled model"
    assert (out / "segmentation.seg.nrrd").stat().st_size > 0
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_keep_samples_writes_each_sample(tmp_path, tiny_model):
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(3, 20, 24)).astype(np.float32))
    src = tmp_path / "in.nrrd"
    sitk.WriteImage(img, str(src))
    assert run_cli("segment", src, "-o", tmp_path / "o", "--model", tiny_model, "--samples", "3",
                   "--steps", "1", "--keep-samples", "--no-crf", "-q") == 0
    assert sorted(p.name for p in (tmp_path / "o" / "samples").iterdir()) == [
        "sample_0.nii.gz", "sample_1.nii.gz", "sample_2.nii.gz"]
    assert not (tmp_path / "o" / "crf.nii.gz").exists()


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    good = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32))
    cases = {}
    cases["missing"] = tmp / "nope.nii.gz"
    p = tmp / "truncated.nii.gz"
    sitk.WriteImage(good, str(p))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    cases["truncated"] = p
    p = tmp / "text.nrrd"
    p.write_text("this is not an image\n")
    cases["not an image"] = p
    p = tmp / "4d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 3, 4, 5), np.float32) * np.arange(5)), str(p))
    cases["4d"] = p
    arr = sitk.GetArrayFromImage(good)
    arr[1, 2, 3] = np.nan
    p = tmp / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    cases["nan"] = p
    p = tmp / "inf.nii.gz"
    arr[1, 2, 3] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    cases["inf"] = p
    p = tmp / "constant.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 16, 16), 7, np.int16)), str(p))
    cases["constant"] = p
    p = tmp / "two_components.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(8, 8, 2)), isVector=True), str(p))
    cases["2-component vector"] = p
    return cases


def test_every_bad_input_fails_cleanly(tmp_path, tiny_model, capsys):
    for why, path in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out_{why.replace(' ', '_')}"
        code = run_cli("segment", path, "-o", out, "--model", tiny_model, "--steps", "1", "-q")
        err = capsys.readouterr().err.strip()
        assert code == 2, why
        assert err.startswith("diffusionseg: error:") and "\n" not in err, (why, err)
        assert not out.exists() or not any(out.iterdir()), f"{why}: output left behind"


def test_rgb_image_into_a_gray_model_is_refused(tmp_path, tiny_model, capsys):
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    p = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(p))
    assert run_cli("segment", p, "-o", tmp_path / "o", "--model", tiny_model, "-q") == 2
    assert "channel" in capsys.readouterr().err


def test_tampered_or_mismatched_model_is_refused(tmp_path, tiny_model, tiny_rgb_model, capsys):
    img = tmp_path / "in.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32)), str(img))
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_model, tampered)
    weights = tampered / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert run_cli("segment", img, "-o", tmp_path / "o1", "--model", tampered, "-q") == 2
    assert "sha256" in capsys.readouterr().err
    # Weights of another architecture under a card whose sha256 was updated to match them.
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_model, mismatched)
    shutil.copy(tiny_rgb_model / "model.safetensors", mismatched / "model.safetensors")
    card = json.loads((mismatched / "model.json").read_text())
    from DiffusionSegLib.core.files import sha256_of

    card["weights_sha256"] = sha256_of(mismatched / "model.safetensors")
    (mismatched / "model.json").write_text(json.dumps(card))
    assert run_cli("segment", img, "-o", tmp_path / "o2", "--model", mismatched, "-q") == 2
    assert "do not match" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_unavailable_device_falls_back_to_cpu(tmp_path, tiny_model, caplog):
    img = tmp_path / "in.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32)), str(img))
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert run_cli("segment", img, "-o", tmp_path / "o", "--model", tiny_model, "--device", "cuda",
                   "--steps", "1", "--samples", "1", "-q") == 0
    assert "falling back to CPU" in caplog.text
    assert json.loads((tmp_path / "o" / "report.json").read_text())["device"] == "cpu"


def test_models_lists_the_bundled_default(capsys):
    assert run_cli("models") == 0
    assert DEFAULT_MODEL in capsys.readouterr().out
    assert resolve_model(None).name == DEFAULT_MODEL


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "DiffusionSegLib", "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "segment" in done.stdout


def test_progress_json_lines_for_other_programs(tmp_path, tiny_model, capsys):
    from DiffusionSegLib.cli.protocol import PROGRESS_PREFIX

    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(16, 20)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    assert run_cli("segment", tmp_path / "in.nrrd", "-o", tmp_path / "o", "--model", tiny_model,
                   "--samples", "2", "--steps", "3", "--progress", "json") == 0
    events = [json.loads(line[len(PROGRESS_PREFIX):]) for line in capsys.readouterr().out.splitlines()
              if line.startswith(PROGRESS_PREFIX)]
    stages = list(dict.fromkeys(e["stage"] for e in events))
    assert stages[0] == "load" and stages[-1] == "write" and "sampling" in stages
    sampling = [(e["done"], e["total"]) for e in events if e["stage"] == "sampling"]
    assert sampling[-1][0] == sampling[-1][1] and [d for d, _ in sampling] == sorted(d for d, _ in sampling)


# --- run settings out of range (issue item 8) -------------------------------------------------------


def cli_exit(*args: str) -> int:
    """Exit status of the CLI, whether main returns it or argparse exits with it."""
    try:
        return run_cli(*args)
    except SystemExit as done:
        return int(done.code or 0)


def tiny_input(tmp: Path) -> Path:
    path = tmp / "in.nrrd"
    pixels = np.random.default_rng(0).normal(size=(16, 20)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    return path


@pytest.mark.parametrize("option, value", [("--steps", "-1"), ("--steps", "0"), ("--samples", "0"),
                                           ("--samples", "-3"), ("--batch-size", "0"), ("--seed", "-1"),
                                           ("--steps", "ten")])
def test_out_of_range_settings_are_one_line_errors(tmp_path, tiny_model, capsys, option, value):
    # 0 used to mean "the card's default" (``opts.samples or card.default_samples``), negative
    # values crashed: both are refused by argparse before anything is loaded.
    out = tmp_path / "o"
    assert cli_exit("segment", tiny_input(tmp_path), "-o", out, "--model", tiny_model, option, value, "-q") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusionseg: error:") and "\n" not in err, err
    assert option in err and value in err, err
    assert not out.exists()


def test_steps_beyond_the_models_training_chain_is_a_one_line_error(tmp_path, tiny_model):
    # The bound depends on the model card (num_train_timesteps, 1000 here), so the library checks
    # it (SettingsError) before sampling; a real child process shows there is no traceback.
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-m", "DiffusionSegLib", "segment", str(tiny_input(tmp_path)),
                           "-o", str(out), "--model", str(tiny_model), "--steps", "5000", "-q"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2, err
    assert err.startswith("diffusionseg: error:") and "\n" not in err and "Traceback" not in err, err
    assert "steps" in err and "5000" in err, err
    assert not out.exists() or not any(out.iterdir()), "no output may be left behind"


# --- a reused output folder (issue item 10) ---------------------------------------------------------


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_into_the_same_folder_holds_only_that_runs_outputs(tmp_path, tiny_model):
    from DiffusionSegLib.outputs.readers import read_outputs

    src, out = tiny_input(tmp_path), tmp_path / "o"
    common = ("segment", src, "-o", out, "--model", tiny_model, "--samples", "2", "--steps", "1", "-q")
    assert run_cli(*common, "--keep-samples") == 0
    assert (out / "crf.nii.gz").is_file() and (out / "samples").is_dir()
    assert run_cli(*common, "--no-crf") == 0
    assert not (out / "crf.nii.gz").exists(), "a stale crf.nii.gz would be read back as this run's CRF mask"
    assert not (out / "samples").exists()
    listed = json.loads((out / "report.json").read_text())["outputs"]
    assert sorted(folder_state(out)) == sorted(listed)
    assert read_outputs(out).refined is None


def test_user_files_in_the_output_folder_are_never_silently_deleted(tmp_path, tiny_model, capsys):
    src, out = tiny_input(tmp_path), tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    common = ("segment", src, "-o", out, "--model", tiny_model, "--samples", "1", "--steps", "1", "--no-crf", "-q")
    assert run_cli(*common) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusionseg: error:") and "\n" not in err and "notes.txt" in err and "--overwrite" in err
    assert folder_state(out) == {"notes.txt": b"mine"}
    assert run_cli(*common, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.json").is_file()
    assert run_cli(*common, "--overwrite") == 0  # and again: the earlier outputs are replaced, notes kept
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failed_run_keeps_the_previous_outputs(tmp_path, tiny_model, capsys):
    src, out = tiny_input(tmp_path), tmp_path / "o"
    assert run_cli("segment", src, "-o", out, "--model", tiny_model, "--samples", "1", "--steps", "1", "-q") == 0
    before = folder_state(out)
    assert run_cli("segment", tmp_path / "missing.nrrd", "-o", out, "--model", tiny_model, "-q") == 2
    assert "missing.nrrd" in capsys.readouterr().err
    assert folder_state(out) == before, "outputs changed or temporary files left behind"


def _read_only_folder(tmp: Path) -> Path:
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root (containers, CI) writes anyway: no such folder to test with
        folder.chmod(0o755)
        pytest.skip("this user can write into a read-only folder")
    return folder


@pytest.mark.parametrize("where", ["read-only folder", "inside a read-only folder", "below a file"])
def test_an_unwritable_output_location_fails_before_sampling(tmp_path, tiny_model, capsys, monkeypatch, where):
    from DiffusionSegLib.pipeline import segment as inference

    def no_sampling(*args, **kwargs):
        raise AssertionError("the run started although its outputs cannot be written")

    monkeypatch.setattr(inference, "segment_file", no_sampling)
    if where == "below a file":
        (tmp_path / "taken").write_text("x")
        out = tmp_path / "taken" / "o"
    else:
        folder = _read_only_folder(tmp_path)
        out = folder if where == "read-only folder" else folder / "o"
    started = time.monotonic()
    try:
        code = run_cli("segment", tiny_input(tmp_path), "-o", out, "--model", tiny_model, "-q")
    finally:
        if where != "below a file":
            (tmp_path / "read-only").chmod(0o755)
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("diffusionseg: error:") and "\n" not in err, err
    assert str(out) in err


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is a POSIX signal")
def test_sigterm_ends_a_run_cleanly_and_keeps_the_earlier_outputs(tmp_path, tiny_model):
    # The Slicer module's cancel (background.SegmentJob) and schedulers send SIGTERM first: the run
    # must unwind (staging folder removed, earlier outputs untouched) rather than die on the spot.
    import signal

    from DiffusionSegLib.cli.protocol import PROGRESS_PREFIX

    src, out = tiny_input(tmp_path), tmp_path / "o"
    assert run_cli("segment", src, "-o", out, "--model", tiny_model, "--samples", "1", "--steps", "1", "-q") == 0
    before = folder_state(out)
    child = subprocess.Popen([sys.executable, "-m", "DiffusionSegLib", "segment", str(src), "-o", str(out),
                              "--model", str(tiny_model), "--samples", "50", "--steps", "1000", "--progress", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in child.stdout:
            if line.startswith(PROGRESS_PREFIX) and json.loads(line[len(PROGRESS_PREFIX):])["stage"] == "sampling":
                break
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "diffusionseg: terminated"
    assert folder_state(out) == before, "staging folder left behind or earlier outputs changed"


# --- the input does not fit the model; before the long work; outputs people can read -------------


@pytest.fixture(scope="module")
def tiny_ct_model(tmp_path_factory):
    """A tiny 2D CT model that states what the bundled one states: CT, HU window, 3 mm, 96 px crops."""
    from helpers import make_model

    return make_model(tmp_path_factory.mktemp("m") / "tiny_ct", modality="CT", spacing=[3.0, 3.0],
                      patch_size=[96, 96], normalization={"kind": "ct_window", "center": 50, "width": 400})


def mr_like_file(tmp: Path) -> Path:
    """An MR-like volume (no air at -1000 HU, values 0..900) with a body-sized field of view."""
    rng = np.random.default_rng(4)
    zz, yy, xx = np.indices((3, 48, 56))
    body = ((yy - 24) / 20.0) ** 2 + ((xx - 28) / 24.0) ** 2 < 1
    image = sitk.GetImageFromArray(np.where(body, rng.uniform(300, 900, body.shape),
                                            rng.uniform(0, 10, body.shape)).astype(np.int16))
    image.SetSpacing((6.0, 6.0, 5.0))  # 336 x 288 mm
    image.SetOrigin((-160.0, -140.0, 0.0))
    path = tmp / "mr_like.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def test_an_mr_like_volume_to_the_ct_model_warns_in_stderr_and_report(tmp_path, tiny_ct_model, capsys):
    out = tmp_path / "o"
    assert run_cli("segment", mr_like_file(tmp_path), "-o", out, "--model", tiny_ct_model, "--samples", "2",
                   "--steps", "1", "--no-crf", "-q") == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("diffusionseg: warning: ")]
    assert len(warned) == 1 and "does not look like CT" in warned[0], err
    report = json.loads((out / "report.json").read_text())
    assert [w["code"] for w in report["warnings"]] == ["modality"]
    assert report["warnings"][0]["message"] in warned[0]
    assert report["modality"]["model"] == "CT" and report["modality"]["input"] == "not CT"


def test_strict_refuses_an_input_that_does_not_fit(tmp_path, tiny_ct_model, capsys, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    monkeypatch.setattr(diffusion, "sample_masks", lambda *a, **k: pytest.fail("sampling started"))
    png = tmp_path / "slice.png"  # a picture: 8-bit values and no spacing, two reasons
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(png))
    out = tmp_path / "o"
    assert run_cli("segment", png, "-o", out, "--model", tiny_ct_model, "--strict", "-q") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("diffusionseg: error: ") for line in lines), lines
    assert "8-bit" in lines[0] and "no pixel spacing" in lines[1]
    assert not out.exists(), "a refused run must leave no output folder"


def test_the_sampling_time_is_announced_before_sampling(tmp_path, tiny_model, capsys, monkeypatch):
    from DiffusionSegLib.methods import diffusion

    real, seen = diffusion.sample_masks, {}

    def recording(*args, **kwargs):
        seen["stderr so far"] = capsys.readouterr().err
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "sample_masks", recording)
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(4, 16, 20)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    assert run_cli("segment", tmp_path / "in.nrrd", "-o", tmp_path / "o", "--model", tiny_model,
                   "--samples", "5", "--steps", "3", "--no-crf") == 0
    estimate = [line for line in seen["stderr so far"].splitlines() if line.startswith("diffusionseg: estimate: ")]
    assert len(estimate) == 1, seen
    assert "on cpu (5 samples x 3 steps x 4 slices = 60 network evaluations" in estimate[0]
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["estimate"]["network_evaluations"] == report["network_evaluations"] == 60


def test_the_progress_bar_counts_network_evaluations_to_its_total(tmp_path, tiny_model, monkeypatch):
    from DiffusionSegLib.cli import progress as cli

    bars = []
    real = cli.sampling_bar

    def keep(quiet):
        bar = real(quiet)
        bars.append(bar)
        return bar

    monkeypatch.setattr(cli, "sampling_bar", keep)
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    # 5 samples x 10 steps x 3 slices in chunks of 4 items: 4 chunks x 10 steps = 40 network calls,
    # which the bar used to show as "40 steps"; it counts the 150 network evaluations now.
    assert run_cli("segment", tmp_path / "in.nrrd", "-o", tmp_path / "o", "--model", tiny_model, "--samples", "5",
                   "--steps", "10", "--batch-size", "4", "--no-crf") == 0
    assert bars[0].last == (150, 150)
    assert "network evaluation" in bars[0].unit


def test_version():
    done = subprocess.run([sys.executable, "-m", "DiffusionSegLib", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    from DiffusionSegLib import __version__

    assert done.returncode == 0 and done.stdout.strip() == f"diffusionseg {__version__}"


def _parsers(parser, path=("diffusionseg",)):
    """(command path, parser) of the parser and every subcommand parser, nested ones included."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_option_has_a_help_line_and_no_markup():
    import argparse
    import re

    from DiffusionSegLib.cli.main import build_parser

    walked = list(_parsers(build_parser()))
    assert {" ".join(path) for path, _ in walked} >= {
        "diffusionseg segment", "diffusionseg evaluate", "diffusionseg models download", "diffusionseg models clear"}
    markup = re.compile(r"``|:(?:ref|func|class|meth|mod):`|\.\. \w+::")
    for path, parser in walked:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{' '.join(path)} {action.option_strings or action.dest}: no help"
        text = parser.format_help()
        assert not markup.search(text), f"{' '.join(path)} --help shows reStructuredText markup: {markup.search(text)}"


def test_models_json_into_a_closed_pipe_ends_quietly(tmp_path, tiny_model):
    # Enough models for the JSON to overflow the pipe buffer (64 KiB), so the child writes after the
    # reader has gone, as with "diffusionseg models --json | head -1".
    folder = tmp_path / "many"
    card = json.loads((tiny_model / "model.json").read_text())
    for i in range(250):
        (folder / f"m{i:03d}").mkdir(parents=True)
        (folder / f"m{i:03d}" / "model.json").write_text(json.dumps({**card, "name": f"m{i:03d}"}))
    env = {**os.environ, "DIFFUSIONSEG_MODELS": str(folder)}
    child = subprocess.Popen([sys.executable, "-m", "DiffusionSegLib", "models", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=REPO, env=env)
    assert child.stdout.readline().strip() == b"["
    child.stdout.close()
    err = child.stderr.read().decode()
    child.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert child.returncode in (0, 141), child.returncode


def test_a_normal_run_shows_no_third_party_future_warning(tmp_path, tiny_model):
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-m", "DiffusionSegLib", "segment",
                           str(tiny_input(tmp_path)), "-o", str(tmp_path / "o"), "--model", str(tiny_model),
                           "--samples", "2", "--steps", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_crf_and_no_crf_exclude_each_other_and_default_to_the_card():
    from DiffusionSegLib.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["segment", "x", "-o", "y"]).crf is None
    assert parser.parse_args(["segment", "x", "-o", "y", "--crf"]).crf == "mean"  # alone: the plain CRF
    assert parser.parse_args(["segment", "x", "-o", "y", "--crf", "published"]).crf == "published"
    assert parser.parse_args(["segment", "x", "-o", "y", "--crf", "off"]).crf == "off"
    assert parser.parse_args(["segment", "x", "-o", "y", "--no-crf"]).crf == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "x", "-o", "y", "--crf", "--no-crf"])
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "x", "-o", "y", "--crf", "median"])
