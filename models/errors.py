"""Errors raised while reading a checkpoint. Both are ValueErrors: the input is wrong, not us."""


class CheckpointError(ValueError):
    """A checkpoint directory or file is malformed: the message names the key and the file."""


class UnsupportedModelError(ValueError):
    """The checkpoint is well formed but describes a model this engine does not implement."""
