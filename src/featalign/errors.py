"""featalign's own error types: every user-facing failure is one of these, with a one-line message."""


class FeatalignError(Exception):
    """Base class; the CLI prints its message without a traceback."""


class DataError(FeatalignError):
    """A malformed data file or record; the message names the file, the line/record and the field."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        if field is not None:
            message = f"field '{field}': {message}"
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class ConfigError(FeatalignError):
    """An invalid setting, or parts (model, SAE, layer) that do not fit together."""


class CacheMismatchError(FeatalignError):
    """An offline reference cache built for another model, SAE, data file or settings."""


class TrainingDivergedError(FeatalignError):
    """A NaN or inf loss; the message gives the step and batch, the last checkpoint is kept."""


class RunFailedError(FeatalignError):
    """A run that a sweep started failed; the message names the run's log, whose end says why."""
