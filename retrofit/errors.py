"""What a user-facing error shows of an exception it wraps."""


def first_line(exc: BaseException) -> str:
    """The exception's first line of text (library messages run to pages), or its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
