"""Errors the user can act on. The CLI prints them as one line on stderr and exits non-zero."""


class DiffusionSegError(Exception):
    """Base class of every error meant for the user (not a bug)."""


class InputImageError(DiffusionSegError):
    """The input image is missing, unreadable, corrupt, or not something the model can take."""


class ModelLoadError(DiffusionSegError):
    """A model folder is missing, corrupt (weights differ from the card's sha256), or its card does not match its weights."""


class DatasetError(DiffusionSegError):
    """A training/evaluation dataset folder is malformed (missing pairs, mismatched geometry...)."""


class SettingsError(DiffusionSegError):
    """A run setting is out of range (samples, steps, batch size...) for the model it is used with."""
