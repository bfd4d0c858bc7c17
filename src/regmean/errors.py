"""The one exception type users see: a message that names the file and the fix."""


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
