"""The one exception type users see: a message that names the file and the fix."""

import os


class RegmeanError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line per problem and exits non-zero."""

    def __init__(self, problems: str | list[str]):
        self.problems = [one_line(p) for p in ([problems] if isinstance(problems, str) else problems)]
        super().__init__("\n".join(self.problems))


class RegmeanWarning(UserWarning):
    """Something the user should look at that does not stop the work; the CLI prints it as one `warning:` line."""


def one_line(text: str, limit: int = 600) -> str:
    """Whitespace (newlines included) collapsed to single spaces, other unprintable characters (terminal escapes)
    written as escapes, cut to `limit` characters: safe to print whatever file the text came from."""
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(str(text).split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def check_path(value: object, name: str, optional: bool = False) -> None:
    """A Python API argument that must be a path (a str or a pathlib.Path; or None where `optional`)."""
    if not (isinstance(value, str | os.PathLike) or (optional and value is None)):
        raise RegmeanError(f"{name}: a path (str or pathlib.Path), not {type(value).__name__}")


def check_whole_number(value: object, name: str, unit: str, least: int = 1) -> None:
    """A Python API argument that must be a whole number (never a bool or a string): a RegmeanError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise RegmeanError(f"{name} {value!r}: a whole number of {unit}, at least {least}")


def check_flag(value: object, name: str) -> None:
    """A Python API switch: True or False (a string such as "no" would otherwise count as true)."""
    if not isinstance(value, bool):
        raise RegmeanError(f"{name} {value!r}: give True or False")


def check_text(value: object, name: str, optional: bool = False) -> None:
    """A Python API argument that must be a string (a device, a column name; or None where `optional`)."""
    if not (isinstance(value, str) or (optional and value is None)):
        raise RegmeanError(f"{name} {value!r}: give a string")
