"""Errors of the top floor. The CLI catches these and every lower floor's errors at one place."""


class PipelineError(Exception):
    """A problem in what the user asked for at the command line or in a config file."""


class ConfigError(PipelineError):
    """Config file or overrides are wrong; every problem is listed in one message."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("config: " + "; ".join(self.problems))
