"""Deep ensembles (models/ensemble.py, card.members, pipeline.segment): a folder assembled from
separately trained models, its integrity checks, and a run that splits the samples over the members."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.core.errors import ModelLoadError
from DiffusionSegLib.methods.registry import load_members, load_model
from DiffusionSegLib.models.card import read_card
from DiffusionSegLib.models.ensemble import make_ensemble
from DiffusionSegLib.pipeline.segment import _member_shares, segment_image
from DiffusionSegLib.pipeline.settings import SegmentSettings
from helpers import make_model


def _seeded_model(folder, seed: int, **fields):
    """A tiny model whose weights depend on ``seed`` (make_model always seeds 0)."""
    path = make_model(folder, **fields)
    from DiffusionSegLib.methods.registry import build_network
    from DiffusionSegLib.models.card import save_model

    card = read_card(path)
    torch.manual_seed(seed)
    save_model(path, build_network(card).state_dict(), card)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    return [_seeded_model(root / f"seed{s}", s) for s in (0, 1, 2)]


def _image() -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(0, 1, (2, 24, 24)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    return image


def test_member_shares_by_hand():
    assert _member_shares(5, 3) == [2, 2, 1]
    assert _member_shares(6, 3) == [2, 2, 2]
    assert _member_shares(2, 3) == [1, 1]  # fewer samples than members: the first ones
    assert _member_shares(1, 1) == [1] and _member_shares(4, 1) == [4]


def test_assembled_folder_loads_every_member(members, tmp_path):
    card = make_ensemble(tmp_path / "ens", members)
    assert [m["file"] for m in card.members] == ["member_1.safetensors", "member_2.safetensors"]
    assert [e["member"] for e in card.training["ensemble"]] == [0, 1, 2]
    net, loaded = load_model(tmp_path / "ens")
    others = load_members(tmp_path / "ens", loaded)
    assert len(others) == 2
    for got, source in zip([net, *others], members):
        want, _ = load_model(source)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    single, _ = load_model(members[0])
    assert load_members(members[0], read_card(members[0])) == []


def test_a_half_precision_ensemble_is_half_the_size_and_loads_the_rounded_weights(members, tmp_path):
    from safetensors.torch import load_file

    full = make_ensemble(tmp_path / "full", members)
    half = make_ensemble(tmp_path / "half", members, half=True)
    for name in ("model.safetensors", "member_1.safetensors", "member_2.safetensors"):
        assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "half" / name)).values())
        assert (tmp_path / "half" / name).stat().st_size < 0.6 * (tmp_path / "full" / name).stat().st_size
        assert (tmp_path / "half" / name).stat().st_mode & 0o044 == 0o044  # readable by other users
    # The card's sha256 are those of the float16 files (a load checks them), and it says how they are stored.
    assert half.weights_sha256 != full.weights_sha256 and "float16" in half.training["weights_storage"]
    net, loaded = load_model(tmp_path / "half")
    for got, source in zip([net, *load_members(tmp_path / "half", loaded)], members):
        want, _ = load_model(source)
        for a, b in zip(got.state_dict().values(), want.state_dict().values()):
            assert a.dtype == torch.float32  # the network itself stays float32
            torch.testing.assert_close(a, b.half().float(), rtol=0, atol=0)  # exactly the rounded weights
    out = segment_image(_image(), tmp_path / "half", SegmentSettings(samples=3, steps=2, crf=False))
    assert out.fused.shape == (1, 2, 24, 24)


def test_a_run_loads_and_hashes_only_what_it_needs(members, tmp_path, monkeypatch):
    """One sample from a 3-member ensemble: the members that draw nothing are not loaded, and no
    member file is hashed twice (load_model checks them all once; the run loads without rehashing)."""
    import DiffusionSegLib.core.files as files
    import DiffusionSegLib.methods.registry as registry
    import DiffusionSegLib.models.store as store

    ens = tmp_path / "ens3"
    make_ensemble(ens, members)
    hashed, built = [], []
    real_hash, real_load = files.sha256_of, registry._load_network
    monkeypatch.setattr(store, "sha256_of", lambda path: hashed.append(path.name) or real_hash(path))
    monkeypatch.setattr(registry, "_load_network", lambda card, path, folder: built.append(path.name) or
                        real_load(card, path, folder))
    segment_image(_image(), ens, SegmentSettings(samples=1, steps=2, crf=False, seed=0, device="cpu"))
    assert built == ["model.safetensors"]
    assert sorted(hashed) == ["member_1.safetensors", "member_2.safetensors", "model.safetensors"]
    built.clear()
    segment_image(_image(), ens, SegmentSettings(samples=2, steps=2, crf=False, seed=0, device="cpu"))
    assert built == ["model.safetensors", "member_1.safetensors"]
    assert len(load_members(ens, read_card(ens), count=1)) == 1


def test_a_run_splits_its_samples_over_the_members(members, tmp_path):
    """N = 3 over 2 members: member 0 draws 2 samples with the run's seed, member 1 one with seed + 1,
    so the ensemble's per-voxel counts are the sum of the two single-model runs."""
    ens = tmp_path / "ens2"
    make_ensemble(ens, members[:2])
    image = _image()
    run = segment_image(image, ens, SegmentSettings(samples=3, steps=2, crf=False, seed=4, device="cpu"))
    a = segment_image(image, members[0], SegmentSettings(samples=2, steps=2, crf=False, seed=4, device="cpu"))
    b = segment_image(image, members[1], SegmentSettings(samples=1, steps=2, crf=False, seed=5, device="cpu"))
    assert run.n_samples == 3
    assert np.array_equal(run.counts, a.counts + b.counts)
    assert run.report["ensemble"]["members"] == 2 and run.report["ensemble"]["samples_per_member"] == [2, 1]
    alone = segment_image(image, members[0], SegmentSettings(samples=3, steps=2, crf=False, seed=4, device="cpu"))
    assert alone.report["ensemble"]["members"] == 1
    assert not np.array_equal(run.counts, alone.counts)  # the second network really took part


def test_mismatched_recipes_and_damaged_members_are_refused(members, tmp_path):
    other = make_model(tmp_path / "wide", network={"channels": [8, 32], "norm_groups": 4})
    with pytest.raises(ModelLoadError, match="network"):
        make_ensemble(tmp_path / "bad", [members[0], other])
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ModelLoadError, match="at least two"):
        make_ensemble(tmp_path / "one", members[:1])
    ens = tmp_path / "ens3"
    make_ensemble(ens, members)
    with pytest.raises(ModelLoadError, match="exists"):
        make_ensemble(ens, members)
    with pytest.raises(ModelLoadError, match="already an ensemble"):
        make_ensemble(tmp_path / "nested", [ens, members[0]])
    blob = bytearray((ens / "member_2.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (ens / "member_2.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ModelLoadError, match="member_2.safetensors"):
        load_model(ens)  # checked before any sampling starts
    card = json.loads((ens / "model.json").read_text())
    card["members"][0]["file"] = "../elsewhere.safetensors"
    (ens / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="member_K"):
        read_card(ens)


def test_an_ensemble_installs_with_its_members_and_a_damaged_one_is_refused(members, tmp_path, monkeypatch):
    from DiffusionSegLib.models.store import install_model

    monkeypatch.setenv("DIFFUSIONSEG_HOME", str(tmp_path / "home"))
    ens = tmp_path / "ens4"
    make_ensemble(ens, members)
    installed = install_model(ens, name="lungs", load_check=load_model)
    assert sorted(p.name for p in installed.glob("*.safetensors")) == [
        "member_1.safetensors", "member_2.safetensors", "model.safetensors"]
    assert len(load_members(installed, read_card(installed))) == 2
    (ens / "member_1.safetensors").write_bytes(b"truncated")
    with pytest.raises(ModelLoadError, match="member_1"):
        install_model(ens, name="broken")


def test_the_model_list_says_it_is_an_ensemble(members, tmp_path, monkeypatch, capsys):
    from DiffusionSegLib.cli.main import main

    monkeypatch.setenv("DIFFUSIONSEG_MODELS", str(tmp_path / "mine"))
    make_ensemble(tmp_path / "mine" / "lungs3", members)
    assert main(["models"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lungs3"))
    assert "medsegdiff ensemble of 3 2D" in line
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["lungs3"]["members"] == 3 and listed["lungs3"]["method"] == "medsegdiff"


def _set_member_flips(folder, flips) -> None:
    card = json.loads((folder / "model.json").read_text())
    card["member_flips"] = flips
    (folder / "model.json").write_text(json.dumps(card))


def test_a_mirrored_member_draws_on_the_mirrored_image_and_its_masks_come_back_mirrored(members, tmp_path):
    """member_flips [[], [1]]: member 1 sees each slice mirrored left-right (the last array axis) and
    its samples are mirrored back, so the counts are member 0 on the image plus member 1 run alone on
    the mirrored image (same seed), mirrored."""
    ens = tmp_path / "flip2"
    make_ensemble(ens, members[:2])
    plain = segment_image(_image(), ens, SegmentSettings(samples=3, steps=2, crf=False, seed=4, device="cpu"))
    _set_member_flips(ens, [[], [1]])
    image = _image()
    mirrored = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(image)[:, :, ::-1]))
    mirrored.CopyInformation(image)
    run = segment_image(image, ens, SegmentSettings(samples=3, steps=2, crf=False, seed=4, device="cpu"))
    a = segment_image(image, members[0], SegmentSettings(samples=2, steps=2, crf=False, seed=4, device="cpu"))
    b = segment_image(mirrored, members[1], SegmentSettings(samples=1, steps=2, crf=False, seed=5, device="cpu"))
    assert np.array_equal(run.counts, a.counts + b.counts[..., ::-1])
    assert not np.array_equal(run.counts, plain.counts)  # the flip took effect
    assert run.report["ensemble"]["member_flips"] == [[], [1]]


@pytest.mark.parametrize("flips", [[[2]], [[1, 1]], [[True]], [[], [1], [0]], [1], "lr"])
def test_bad_member_flips_are_refused_before_any_weights_load(members, tmp_path, monkeypatch, flips):
    import DiffusionSegLib.methods.registry as registry

    ens = tmp_path / "badflip"
    make_ensemble(ens, members[:2])
    _set_member_flips(ens, flips)
    monkeypatch.setattr(registry, "_load_network", lambda *a: pytest.fail("weights loaded for a bad card"))
    with pytest.raises(ModelLoadError, match="member_flips"):
        segment_image(_image(), ens, SegmentSettings(samples=2, steps=2, crf=False, device="cpu"))
