"""User-facing errors: one clear line naming what was wrong and what is valid."""


class PrunekitError(ValueError):
    """Bad input from the user. The CLI prints it as one line and exits with code 2."""


def choice_error(kind: str, value: object, valid: object) -> PrunekitError:
    """`unknown method 'foo'; valid: a, b, c`."""
    names = ", ".join(str(v) for v in valid)
    return PrunekitError(f"unknown {kind} {value!r}; valid: {names}")
