"""The one settings object: the command line it builds parses back to the same settings, checks, enums."""

from __future__ import annotations

import dataclasses

import pytest

from DiffusionSegLib.cli.main import build_parser
from DiffusionSegLib.core.enums import Fusion, Sampler, Uncertainty
from DiffusionSegLib.core.errors import SettingsError
from DiffusionSegLib.pipeline.settings import SegmentSettings

# Every field away from its default: the round trip then covers every option.
EVERYTHING = SegmentSettings(model="some/model dir", task="lung", samples=7, steps=12, sampler=Sampler.DDPM, seed=9,
                             device="cpu", batch_size=3, crf=False, crf_backend="torch-meanfield",
                             fusion=Fusion.STAPLE, uncertainty=Uncertainty.ENTROPY, keep_samples=True,
                             postprocess=False, crop=False, amp=True, strict=True)


def parse_segment(argv: list[str]) -> SegmentSettings:
    return SegmentSettings.from_args(build_parser().parse_args(["segment", "in.nii.gz", "-o", "out", *argv]))


def test_every_field_differs_from_its_default_in_the_round_trip_case():
    for f in dataclasses.fields(SegmentSettings):
        assert getattr(EVERYTHING, f.name) != f.default, f.name


@pytest.mark.parametrize("settings", [SegmentSettings(), EVERYTHING, SegmentSettings(crf=True, amp=False),
                                      SegmentSettings(samples=1, steps=1, sampler="ddim", seed=0)])
def test_the_command_line_a_setting_builds_parses_back_to_it(settings):
    assert parse_segment(settings.to_argv()) == settings


def test_defaults_build_an_empty_command_line_so_the_card_decides():
    assert SegmentSettings().to_argv() == []
    assert "--no-crf" in SegmentSettings(crf=False).to_argv() and "--crf" in SegmentSettings(crf=True).to_argv()


def test_plain_strings_become_the_enum_members():
    s = SegmentSettings(sampler="ddpm", fusion="staple", uncertainty="entropy")
    assert s.sampler is Sampler.DDPM and s.fusion is Fusion.STAPLE and s.uncertainty is Uncertainty.ENTROPY
    assert s.sampler == "ddpm" and f"{s.fusion}" == "staple"  # still their spelling in reports and argv


@pytest.mark.parametrize("kwargs, message", [
    ({"fusion": "median"}, "unknown fusion 'median' (use mean, staple)"),
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
    ({"uncertainty": "std"}, "unknown uncertainty 'std'"),
    ({"crf_backend": "gpu"}, "unknown crf_backend 'gpu' (use auto, pydensecrf, torch-meanfield)"),
])
def test_unknown_choices_are_refused_when_the_settings_are_made(kwargs, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SegmentSettings(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "samples must be a whole number >= 1"),
    ({"steps": 2.5}, "steps must be a whole number >= 1"),
    ({"batch_size": True}, "batch size must be a whole number >= 1"),
    ({"seed": -1}, "seed must be a whole number >= 0"),
    ({"sampler": "none"}, "unknown sampler 'none'"),
])
def test_check_refuses_settings_no_run_can_use(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        SegmentSettings(**kwargs).check()


def test_steps_beyond_the_models_training_timesteps_are_refused_with_the_card():
    SegmentSettings(steps=1000).check()
    SegmentSettings(steps=1000).check(num_train_timesteps=1000)
    with pytest.raises(SettingsError, match="cannot exceed the model's 1000 training timesteps"):
        SegmentSettings(steps=1001).check(num_train_timesteps=1000)
