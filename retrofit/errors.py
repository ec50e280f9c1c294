"""User-facing errors: a setting the user can fix, and what such an error shows of an exception it wraps."""


def first_line(exc: BaseException) -> str:
    """The exception's first line of text (library messages run to pages), or its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ConfigError(ValueError):
    """A setting (flag, path, run folder) the user can fix; train.py prints it as one `error:` line."""
