"""User-facing errors: the CLI prints their message as one line and exits non-zero.

Raise these (never bare exceptions) for anything the user can fix: a bad config key, a
missing or corrupt file, a checksum mismatch. The message names the file/key/value at
fault and what was expected.
"""


class KDistillError(Exception):
    """Base class of errors caused by the user's input, shown without a traceback."""


class ConfigError(KDistillError):
    """A config file or override is malformed, unknown, mistyped or impossible."""


class DataError(KDistillError):
    """A data set is missing, unreadable, corrupt or inconsistent."""


class CheckpointError(KDistillError):
    """A checkpoint is missing, truncated, unsafe or of the wrong model."""


class TrainingError(KDistillError):
    """Training diverged (non-finite loss) or collapsed (accuracy at chance)."""


class CacheError(KDistillError):
    """A teacher cache is unreadable, or was made for other data, teacher or augmentation."""


class ExportError(KDistillError):
    """A model cannot be exported, or the exported file does not reproduce the model."""


class ReportError(KDistillError):
    """A run directory cannot be reported on (missing or malformed summary.json)."""


class DistributedError(KDistillError):
    """A multi-process job cannot start, or one of its processes died or stopped responding."""
