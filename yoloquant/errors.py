"""Errors raised for bad user input. Each message says what is wrong and how to fix it."""


class YoloQuantError(Exception):
    """Base class: a problem the user can fix (bad config, missing file, bad model...)."""


class ConfigError(YoloQuantError):
    """The YAML config or a command-line flag is invalid."""


class ModelError(YoloQuantError):
    """The model file is missing, corrupt, or has a layout we cannot handle."""


class DataError(YoloQuantError):
    """The data set (images or annotations) is missing or inconsistent."""


class RuntimeDefectError(ModelError):
    """A runtime computes this model wrongly on this machine (checked by measurement)."""
