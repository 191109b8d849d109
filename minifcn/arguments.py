"""Argument checks shared by ops, layers and kernels: a bad value is an error that
names the argument, the value it got and what was expected, raised where the
call is made rather than deep inside NumPy."""

import numbers


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name, value, minimum):
    """``value`` as an int >= minimum, or ValueError naming ``name``."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def pair(name, value, minimum):
    """An int or a pair of ints as a (height, width) tuple of ints >= ``minimum``."""
    both = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(both) != 2 or not all(_is_int(v) for v in both):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(both) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in both)


def show_pair(hw):
    """(3, 3) -> '3', (3, 1) -> '(3, 1)': how error messages print a pair."""
    return str(hw[0]) if hw[0] == hw[1] else str(tuple(hw))


def probability(name, value):
    """``value`` as a float in [0, 1], or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)
