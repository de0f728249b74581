"""The one settings object of a segmentation run, from the Slicer panel or the command line to the sampler.

``SegmentSettings`` is built by the panel (``slicer.logic``) or parsed from the ``segment`` command
line (``from_args``); the background job turns it back into a command line with ``to_argv``; the
pipeline reads it. Each field names its command-line option once (``metadata["flag"]``), and the
CLI adds its options from these fields (``add_arguments``), so the two spellings cannot drift.
None means "the model card's default".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from DiffusionSegLib.core.enums import CrfBackend, CrfMode, Fusion, Sampler, Uncertainty
from DiffusionSegLib.core.errors import SettingsError



def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum``, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"  # argparse names the type in some messages
    return parse


def _option(default: Any, flag: str, help: str, kind: str, **extra: Any) -> Any:
    """A settings field with its command-line spelling. kind: value | enum | switch | tristate | keep | mode."""
    return field(default=default, metadata={"flag": flag, "help": help, "kind": kind, **extra})


@dataclass
class SegmentSettings:
    """Every setting of one run (None: the model card's default)."""

    model: str | None = _option(None, "--model", "model folder or name (default: the bundled default model)",
                                "value")
    task: str | None = _option(None, "--task", "the task of a multi-task model, e.g. lung, liver or brain (one of "
                               "the model card's tasks; a single-task model takes none)", "value")
    samples: int | None = _option(None, "--samples", "number of sampled masks N >= 1 (default: model card)",
                                  "value", type=int_at_least(1))
    steps: int | None = _option(None, "--steps", "denoising steps K per sample, 1 to the model's training "
                                "timesteps (default: model card)", "value", type=int_at_least(1))
    sampler: Sampler | None = _option(None, "--sampler", "ddim (short chains, default) or ddpm (full chain)",
                                      "enum", enum=Sampler, choices=(Sampler.DDIM.value, Sampler.DDPM.value))
    seed: int = _option(0, "--seed", "random seed >= 0 (same seed, same device -> same output)", "value",
                        type=int_at_least(0))
    device: str = _option("auto", "--device", "auto|cpu|cuda|mps (unavailable -> CPU with a warning)", "value")
    batch_size: int | None = _option(None, "--batch-size", "items per network call >= 1 (default: from free "
                                     "memory)", "value", type=int_at_least(1))
    crf: CrfMode | None = _option(None, "--crf", "refine with DenseCRF: mean (one CRF of the fused map; the "
                                  "value when --crf is given alone), published (DiffSeg: 3 rounds on the mean of 4 "
                                  "random samples) or off (default: as the model card says)", "mode",
                                  enum=CrfMode, choices=CrfMode.values(), const=CrfMode.MEAN.value,
                                  off_flag="--no-crf", off_help="skip DenseCRF refinement (= --crf off)")
    crf_backend: CrfBackend = _option(CrfBackend.AUTO, "--crf-backend", "DenseCRF implementation: auto (pydensecrf when "
                               "installed, else torch-meanfield), pydensecrf or torch-meanfield", "enum",
                                      enum=CrfBackend, choices=CrfBackend.values())
    fusion: Fusion = _option(Fusion.MEAN, "--fusion", "how the samples are fused: mean > 0.5 (default) or "
                             "SimpleITK STAPLE", "enum", enum=Fusion, choices=Fusion.values())
    uncertainty: Uncertainty = _option(Uncertainty.VARIANCE, "--uncertainty", "uncertainty map: variance "
                                       "p(1-p) of the sample mean p (default) or binary entropy in bits", "enum",
                                       enum=Uncertainty, choices=Uncertainty.values())
    keep_samples: bool = _option(False, "--keep-samples", "also write each sampled mask", "switch")
    postprocess: bool = _option(True, "--no-postprocess", "skip the model card's post-processing "
                                "(region, consistent and largest connected components)", "keep")
    crop: bool = _option(True, "--no-crop", "sample the whole image even where the model card crops it to a "
                         "region first (crop_to_region, e.g. a lung model to the chest cavity)", "keep")
    amp: bool | None = _option(None, "--amp", "mixed precision autocast (default: on CUDA only)", "tristate",
                               off_help="float32 everywhere")
    strict: bool = _option(False, "--strict", "refuse an input that does not fit the model (exit 2, one line "
                           "per reason) instead of warning and running", "switch")

    def __post_init__(self) -> None:
        if isinstance(self.crf, bool):  # crf=True / False, as older scripts say: the plain CRF / none
            self.crf = CrfMode.MEAN if self.crf else CrfMode.OFF
        # Plain strings (a parameter node, a JSON file, an old script) become the enum members.
        for f in dataclasses.fields(self):
            enum = f.metadata.get("enum")
            value = getattr(self, f.name)
            if enum is not None and value is not None and not isinstance(value, enum):
                try:
                    setattr(self, f.name, enum.parse(value, f.name))
                except ValueError as err:
                    raise SettingsError(str(err)) from None
        if self.model is not None:
            self.model = os.fspath(self.model)

    def check(self, num_train_timesteps: int | None = None) -> None:
        """Raise SettingsError for a setting no run can use.

        Called before the model is loaded (``num_train_timesteps`` None: card-free checks) and again
        with the card's T, so a bad setting fails in well under a second, never after sampling.
        """

        def whole(name: str, value: Any, minimum: int) -> None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise SettingsError(f"{name} must be a whole number >= {minimum}"
                                    + (" (or unset for the model's default)" if minimum else "") + f", got {value!r}")

        whole("samples", self.samples, 1)
        whole("steps", self.steps, 1)
        whole("batch size", self.batch_size, 1)
        if self.seed is None:
            raise SettingsError("seed must be a whole number >= 0, got None")
        whole("seed", self.seed, 0)
        if self.sampler == Sampler.NONE:
            raise SettingsError(f"unknown sampler {self.sampler.value!r} (use ddim, ddpm)")
        if num_train_timesteps is not None and self.steps is not None and self.steps > num_train_timesteps:
            raise SettingsError(f"steps ({self.steps}) cannot exceed the model's {num_train_timesteps} training "
                                "timesteps")

    # -- the command line ---------------------------------------------------------------------

    def to_argv(self) -> list[str]:
        """The ``segment`` options that reproduce these settings (defaults are left out)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value, flag, kind = getattr(self, f.name), f.metadata["flag"], f.metadata["kind"]
            if value == f.default:
                continue
            if kind == "switch":
                argv.append(flag)
            elif kind == "keep":  # default True; its flag turns it off
                argv.append(flag)
            elif kind == "tristate":
                argv.append(flag if value else "--no-" + flag[2:])
            elif kind == "mode" and value == CrfMode.OFF:
                argv.append(f.metadata["off_flag"])
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "SegmentSettings":
        """The settings of a parsed command line (fields it has no option for keep their default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        values.update(overrides)
        return cls(**values)


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add the options of the settings ``names`` (all when None), in field order, to ``parser``.

    Range checks here need no model; the bound that depends on the model card (steps <= its
    training timesteps) is checked by ``SegmentSettings.check`` before sampling.
    """
    wanted = None if names is None else set(names)
    for f in dataclasses.fields(SegmentSettings):
        if wanted is not None and f.name not in wanted:
            continue
        meta, flag = f.metadata, f.metadata["flag"]
        kind = meta["kind"]
        if kind == "switch":
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
        elif kind == "keep":
            parser.add_argument(flag, dest=f.name, action="store_false", help=meta["help"])
        elif kind == "mode":  # --crf [MODE] / --no-crf
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag, dest=f.name, nargs="?", const=meta["const"], default=None,
                               choices=meta["choices"], help=meta["help"])
            group.add_argument(meta["off_flag"], dest=f.name, action="store_const", const=CrfMode.OFF.value,
                               help=meta["off_help"])
        elif kind == "tristate":
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=meta["help"])
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=False,
                               help=meta["off_help"])
        else:
            kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": meta["help"]}
            if "type" in meta:
                kwargs["type"] = meta["type"]
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if kind == "enum" and f.default is not None:
                kwargs["default"] = f.default.value
            parser.add_argument(flag, **kwargs)
