"""Errors the stages report as one line (no traceback) and exit non-zero on."""


class DmpError(Exception):
    """Base class: the message is a single line naming the file, field or key at fault."""


class DataError(DmpError):
    """Bad or missing input data (a file, a JSON entry, a split)."""


class CheckpointError(DmpError):
    """A checkpoint that is corrupt or belongs to another model/variant."""


class TrainingError(DmpError):
    """Training cannot go on (e.g. a non-finite loss)."""
