"""The one exception type users see: a message that names the file and the fix."""


class RegmeanError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line per problem and exits non-zero."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
