"""Every training config the docs run (docs/benchmarks/*config*.json) is a valid training setting, so a
reader who repeats a documented command gets a run, not an 'unknown setting' error."""

from __future__ import annotations

import json

import pytest

from helpers import REPO
from DiffusionSegLib.training.loop import TrainConfig

CONFIGS = sorted((REPO / "docs" / "benchmarks").glob("*config*.json"))


def test_the_docs_have_training_configs():
    assert any(path.name == "unisegdiff_unified_tasks_config.json" for path in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_documented_config_is_a_valid_training_setting(path):
    values = json.loads(path.read_text())
    # A pretrained backbone is made by the documented `diffusionseg pretrain` command first: only its
    # spelling is checked here, not that the folder exists yet.
    assert isinstance(values.get("pretrained_backbone", ""), (str, type(None)))
    values.pop("pretrained_backbone", None)
    TrainConfig.from_dict(values).check()
