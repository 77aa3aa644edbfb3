"""Errors of the top floor. The CLI catches these and every lower floor's errors at one place."""


class PipelineError(Exception):
    """A problem in what the user asked for at the command line."""
