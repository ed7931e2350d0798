"""The project's exception types: every error a user can cause names its problem in plain words."""


class FornaxError(Exception):
    """Base class: a problem with the user's input or environment, safe to show as-is in the UI."""


class ModelLoadError(FornaxError):
    """A model source could not be found, read or understood."""


class UnsupportedModelError(ModelLoadError):
    """The model is readable but its architecture or format is not one Fornax runs."""


class GenerationError(FornaxError, ValueError):
    """A prompt or sampling parameter is out of range."""


class TrainError(FornaxError, ValueError):
    """A training run cannot start or go on: bad data, a bad hyper-parameter, an unusable output folder."""


class ScoringError(FornaxError, ValueError):
    """An evaluation cannot run: unknown metric, empty or unreadable data, mismatched counts, a bad window."""
