"""Argument checks shared by the package: one function per rule, one message format.

Every error says what was received and what is allowed, in the form Keras uses::

    ValueError: Invalid optimizer. Received: optimizer='lamb'. Allowed: 'sgd', 'adam', 'rmsprop'.

>>> check_choice("mode", "fan_in", ("fan_in", "fan_out"))
'fan_in'
>>> check_number("depth", 30, integer=True, minimum=2)
30
"""
import math
import numbers


def invalid(name, value, allowed, reason=None):
    """The package's one error format: ``ValueError("Invalid <name>. Received: <name>=<value
    repr>. Allowed: <allowed>.")``, with an optional reason before "Received"."""
    lead = reason.rstrip(".") + "." if reason else f"Invalid {name}."
    return ValueError(f"{lead} Received: {name}={value!r}. Allowed: {allowed}.")


def format_choices(allowed):
    """``('a', None)`` -> ``"'a', None"`` (the "Allowed" part of a choice error)."""
    return ", ".join(repr(choice) for choice in allowed)


def check_choice(name, value, allowed):
    """Return ``value`` if it is one of ``allowed``, else raise ``invalid(...)``. A bool
    matches only a bool (``True`` is not the choice ``1``)."""
    def same(choice):
        if isinstance(value, bool) or isinstance(choice, bool):
            return value is choice
        return bool(value == choice)

    try:
        ok = any(same(choice) for choice in allowed)
    except (TypeError, ValueError):  # e.g. an array compared element-wise
        ok = False
    if not ok:
        raise invalid(name, value, format_choices(allowed))
    return value


def describe_range(integer=False, minimum=None, maximum=None, above=None, below=None,
                   allow_none=False):
    """The "Allowed" text of a number check, e.g. "an integer >= 2", "a finite number in
    [0, 1)", "an integer >= 1 or None"."""
    kind = "an integer" if integer else "a finite number"
    low = (f"[{_number(minimum)}" if minimum is not None else f"({_number(above)}"
           if above is not None else None)
    high = (f"{_number(maximum)}]" if maximum is not None else f"{_number(below)})"
            if below is not None else None)
    if low and high:
        text = f"{kind} in {low}, {high}"
    elif low:
        text = f"{kind} {'>=' if minimum is not None else '>'} {low[1:]}"
    elif high:
        text = f"{kind} {'<=' if maximum is not None else '<'} {high[:-1]}"
    else:
        text = kind
    return text + (" or None" if allow_none else "")


def _number(x):
    return str(x) if isinstance(x, numbers.Integral) else f"{x:g}"


def check_number(name, value, *, integer=False, minimum=None, maximum=None, above=None,
                 below=None, allow_none=False):
    """Return ``value`` if it is a (finite) number within the bounds, else raise.

    Args:
        integer: require an integral number (bools are never numbers here).
        minimum, maximum: inclusive bounds; above, below: exclusive bounds.
        allow_none: accept None as well.
    """
    if value is None and allow_none:
        return value
    kind = numbers.Integral if integer else numbers.Real
    ok = (not isinstance(value, bool) and isinstance(value, kind) and math.isfinite(value)
          and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
          and (above is None or value > above) and (below is None or value < below))
    if not ok:
        raise invalid(name, value, describe_range(integer, minimum, maximum, above, below,
                                                  allow_none))
    return value
