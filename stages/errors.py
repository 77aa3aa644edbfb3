"""Errors raised by the stages: bad input the user can fix, with a message that says how."""


class StageError(Exception):
    """A stage cannot proceed; the message is one line that tells the user what to do."""


class ModelError(StageError):
    """A teacher or student model cannot be found, converted or used."""


class DataError(StageError):
    """The dataset is missing, empty, malformed or too small for the settings."""


class InvalidConfig(StageError):
    """A config (file, overrides or a stage's config) has problems; all of them are listed, not
    only the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("config: " + "; ".join(self.problems))
