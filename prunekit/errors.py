"""User-facing errors: one clear line naming what was wrong and what is valid."""


class PrunekitError(ValueError):
    """Bad input from the user. The CLI prints it as one line and exits with code 2."""


def choice_error(kind: str, value: object, valid: object) -> PrunekitError:
    """`unknown method 'foo'; valid: a, b, c`."""
    names = ", ".join(str(v) for v in valid)
    return PrunekitError(f"unknown {kind} {value!r}; valid: {names}")


def read_text(path, what: str) -> str:
    """The UTF-8 text of `path` (`what` names it in errors: "calibration text", ...)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PrunekitError(
            f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    except OSError as err:
        raise PrunekitError(f"cannot read {what} {path}: {err.strerror or err}") from None
