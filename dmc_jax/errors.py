"""User-facing errors: one line that names the problem and what to do; the CLI exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, files, prompts). Printed as one line, exit code 2, no traceback."""


def require(condition: bool, message: str) -> None:
    """Raises UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, caught where the run knows how far it got: one line saying where it stopped and how to resume."""
