"""Fine-tuning: a run that starts from a model folder's weights (``fine_tune_from``, ``fine_tune_member``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_shapes
from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.models.ensemble import make_ensemble
from DiffusionSegLib.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

NET = {"channels": [8, 16], "norm_groups": 4}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine_tune_shapes")
    write_shapes(root, 4, seed=0)
    return root


def config(**kwargs) -> TrainConfig:
    base = dict(method="unisegdiff", network=dict(NET), patch_size=[16, 16], batch_size=2, lr=1e-2, steps=1,
                val_every=1, checkpoint_every=1, val_cases=1, val_samples=1, val_steps=3, seed=0, device="cpu",
                augment=False)
    return TrainConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def sources(shapes, tmp_path_factory):
    """Two trained models (seeds 0 and 1) and their ensemble (float16, as the bundled ones)."""
    root = tmp_path_factory.mktemp("fine_tune_sources")
    for seed in (0, 1):
        train(shapes, root / f"seed{seed}", config(seed=seed), progress=False)
    make_ensemble(root / "ensemble", [root / "seed0", root / "seed1"], half=True)
    return root


def _weights(folder, name="model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def test_a_fine_tuning_run_starts_from_the_folders_weights(shapes, sources, tmp_path):
    # lr 0: nothing moves, so the run's weights are the ones it started from.
    card = train(shapes, tmp_path / "ft", config(seed=5, lr=0.0, fine_tune_from=str(sources / "seed1")),
                 progress=False)
    start, tuned = _weights(sources / "seed1"), _weights(tmp_path / "ft")
    assert start.keys() == tuned.keys() and all(torch.equal(start[k], tuned[k]) for k in start)
    scratch = train(shapes, tmp_path / "scratch", config(seed=5, lr=0.0), progress=False)
    assert scratch.training.get("fine_tuned_from") is None
    assert not all(torch.equal(start[k], v) for k, v in _weights(tmp_path / "scratch").items())
    recorded = json.loads((tmp_path / "ft" / "model.json").read_text())["training"]["fine_tuned_from"]
    assert recorded["member"] == 0 and recorded["weights_sha256"] == card.training["fine_tuned_from"]["weights_sha256"]
    assert recorded["weights_sha256"] == json.loads((sources / "seed1" / "model.json").read_text())["weights_sha256"]


def test_an_ensemble_member_can_start_the_run(shapes, sources, tmp_path):
    train(shapes, tmp_path / "ft", config(lr=0.0, fine_tune_from=str(sources / "ensemble"), fine_tune_member=1),
          progress=False)
    member = _weights(sources / "ensemble", "member_1.safetensors")  # seed 1's network, stored as float16
    tuned = _weights(tmp_path / "ft")
    assert all(torch.equal(member[k].float(), tuned[k].float()) for k in member)


@pytest.mark.parametrize("change, match", [
    ({"network": {"channels": [8, 24], "norm_groups": 4}}, "differs from this run's in network"),
    ({"fine_tune_member": 2}, "member 2 .* has 2 network"),
])
def test_a_folder_that_does_not_fit_is_refused_before_training(shapes, sources, tmp_path, change, match):
    with pytest.raises(DiffusionSegError, match=match):
        train(shapes, tmp_path / "ft", config(fine_tune_from=str(sources / "ensemble"), **change), progress=False)
    assert not (tmp_path / "ft" / "model.safetensors").exists()


@pytest.mark.parametrize("change, match", [
    ({"fine_tune_from": "/nonexistent/model"}, "no model.json there"),
    ({"fine_tune_member": -1}, "fine_tune_member -1"),
])
def test_malformed_fine_tune_settings_are_refused(shapes, tmp_path, change, match):
    with pytest.raises(DiffusionSegError, match=match):
        train(shapes, tmp_path / "ft", config(**change), progress=False)


def test_only_the_chosen_networks_file_is_read_and_checked(sources, tmp_path):
    """load_network: network K alone, its sha256 checked; another network's corrupt file is not read."""
    import shutil

    from DiffusionSegLib.core.errors import ModelLoadError
    from DiffusionSegLib.methods.registry import load_network
    from DiffusionSegLib.models.card import read_card

    folder = tmp_path / "ensemble"
    shutil.copytree(sources / "ensemble", folder)
    card = read_card(folder)
    (folder / "model.safetensors").write_bytes(b"not the weights")  # network 0 corrupt
    member = load_network(folder, card, 1)
    stored = _weights(folder, "member_1.safetensors")
    assert all(torch.equal(stored[k].float(), v.float()) for k, v in member.state_dict().items())
    with pytest.raises(ModelLoadError, match="sha256 of .*model.safetensors"):
        load_network(folder, card, 0)
