"""Errors that carry a message meant for the user: what is wrong and what to do."""


class NeoxkoError(Exception):
    """Bad input from the user; the command line prints the message without a traceback."""


class EveryRankError(NeoxkoError):
    """A refusal every rank of a torchrun launch reaches alike (the launch's sizes): printed by rank 0 only."""


class ConfigError(NeoxkoError, ValueError):
    """A model config that neoxko cannot build."""


class CheckpointError(NeoxkoError):
    """A checkpoint folder, file or hub id that cannot be loaded."""


class GenerationError(NeoxkoError, ValueError):
    """Invalid generation settings or a prompt that does not fit."""
