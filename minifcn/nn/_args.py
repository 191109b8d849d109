"""Argument checks shared by the layer constructors: a bad size is a ValueError
that names the argument and the value it got, raised when the layer is built
rather than deep inside the first forward pass."""

import numbers


def check_int(name, value, minimum):
    """``value`` as an int >= minimum, or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def pair(name, value, minimum):
    """An int or a pair of ints -> (h, w), each >= minimum."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
        return check_int(name, value[0], minimum), check_int(name, value[1], minimum)
    value = check_int(name, value, minimum)
    return value, value


def probability(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)
