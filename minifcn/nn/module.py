"""``Module`` and ``Parameter``: how a network holds its weights.

A Module is a tree. Assigning a ``Parameter`` or another ``Module`` to an
attribute registers it, in definition order, so a network written as

    class Net(Module):
        def __init__(self):
            super().__init__()
            self.conv1 = Conv2d(3, 8, 3)
            self.score = Conv2d(8, 2, 1)

has ``named_parameters()`` "conv1.weight", "conv1.bias", "score.weight",
"score.bias". Buffers (``register_buffer``) are arrays that belong to the
state but are not learned, e.g. BatchNorm's running statistics: they are
saved and loaded with the parameters and moved by ``to()``, but no optimiser
sees them.

``state_dict()`` is the whole state as NumPy copies, name -> array; it is
what checkpoints store. ``load_state_dict()`` is strict: one error lists
every missing, unexpected and mis-shaped name, and nothing is changed
unless everything fits.
"""

from collections.abc import Mapping
from typing import NamedTuple

import numpy

from minifcn import backend
from minifcn.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimiser updates.

    ``requires_grad`` is True by default; a frozen parameter
    (``requires_grad=False``) gets no gradient and optimisers skip it, but it
    is still listed by ``parameters()`` and saved by ``state_dict()``.
    """

    def __init__(self, data, requires_grad=True, dtype=None):
        if dtype is None and not (_is_array(data) or isinstance(data, Tensor)):
            dtype = numpy.float32  # lists and numbers: float32, as for any Tensor
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self):
        frozen = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device!r}{frozen})"


class StateDictError(ValueError):
    """A state dict that does not fit a model; lists every problem at once."""

    def __init__(self, model_name, missing=(), unexpected=(), mismatched=(), source=None):
        self.model_name, self.source = model_name, source
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        where = f" from {source}" if source else ""
        lines = [f"cannot load state dict{where} into {model_name}:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(f"  mismatched ({len(self.mismatched)}): " + "; ".join(self.mismatched))
        super().__init__("\n".join(lines))

    def with_source(self, source):
        """The same error, naming the file it came from."""
        return StateDictError(self.model_name, self.missing, self.unexpected, self.mismatched, source)


class LoadResult(NamedTuple):
    """What ``load_state_dict(strict=False)`` skipped (both empty after a strict load)."""
    missing: list
    unexpected: list


def _is_array(value):
    return isinstance(value, numpy.ndarray) or backend.is_cuda(value)


def _numpy_copy(array):
    return array.get() if backend.is_cuda(array) else numpy.array(array, copy=True)


class Module:
    """Base class of every layer and network: subclass it and define ``forward``."""

    def __init__(self):
        # _members: name -> Parameter | Module | array | None, in definition order;
        # _kinds: name -> "parameter" | "module" | "buffer".
        object.__setattr__(self, "_members", {})
        object.__setattr__(self, "_kinds", {})
        object.__setattr__(self, "training", True)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- registration -------------------------------------------------------
    def __setattr__(self, name, value):
        members = self.__dict__.get("_members")
        if members is None:
            if isinstance(value, (Parameter, Module)):
                raise AttributeError(f"cannot assign {type(value).__name__} {name!r} before Module.__init__(): "
                                     f"call super().__init__() first in {type(self).__name__}.__init__")
            object.__setattr__(self, name, value)
            return
        kind = self._kinds.get(name)
        if isinstance(value, Parameter):
            new_kind = "parameter"
        elif isinstance(value, Module):
            new_kind = "module"
        elif kind in ("parameter", "module") and value is None:
            new_kind = kind
        elif kind == "buffer":
            self._check_buffer(name, value)
            new_kind = kind
        elif kind is not None:
            raise TypeError(f"cannot assign a {type(value).__name__} to {name!r} of {type(self).__name__}: "
                            f"it is a {kind}; assign a {'Parameter' if kind == 'parameter' else 'Module'} or None")
        else:
            object.__setattr__(self, name, value)  # a plain attribute
            return
        self._register(name, value, new_kind)

    def _register(self, name, value, kind):
        if "." in name or not name:
            raise KeyError(f"a member name must be non-empty and contain no '.', got {name!r}")
        self.__dict__.pop(name, None)  # a plain attribute of that name gives way
        if self._kinds.get(name, kind) != kind:
            del self._members[name]  # changing kind: re-register at the end
        self._members[name] = value
        self._kinds[name] = kind

    def __getattr__(self, name):  # only called when normal lookup fails
        members = self.__dict__.get("_members")
        if members is not None and name in members:
            return members[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        if name in self._members:
            del self._members[name]
            del self._kinds[name]
        else:
            object.__delattr__(self, name)

    def __dir__(self):
        return list(super().__dir__()) + list(self._members)

    def register_parameter(self, name, param):
        """Register ``param`` (a Parameter, or None for an absent one such as bias=None)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter({name!r}) needs a Parameter or None, got {type(param).__name__}")
        self._register(name, param, "parameter")

    def register_buffer(self, name, array):
        """Register a state array that is saved and moved with the module but not learned."""
        if name in self._kinds and self._kinds[name] != "buffer":
            raise KeyError(f"{name!r} is already a {self._kinds[name]} of {type(self).__name__}")
        self._check_buffer(name, array)
        self._register(name, array, "buffer")

    @staticmethod
    def _check_buffer(name, array):
        if array is not None and not _is_array(array):
            raise TypeError(f"buffer {name!r} must be a NumPy/CuPy array or None, got {type(array).__name__}")

    # ---- walking the tree ------------------------------------------------------
    def _walk(self, prefix="", seen=None):
        """(name, owner, attribute, kind, value) for every parameter and buffer,
        in definition order, descending into submodules where they are defined.
        A parameter or module shared by two owners is listed once."""
        seen = set() if seen is None else seen
        for attr, value in self._members.items():
            if value is None or id(value) in seen:
                continue
            kind = self._kinds[attr]
            if kind != "buffer":
                seen.add(id(value))
            if kind == "module":
                yield from value._walk(f"{prefix}{attr}.", seen)
            else:
                yield f"{prefix}{attr}", self, attr, kind, value

    def named_parameters(self):
        for name, _, _, kind, value in self._walk():
            if kind == "parameter":
                yield name, value

    def parameters(self):
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self):
        for name, _, _, kind, value in self._walk():
            if kind == "buffer":
                yield name, value

    def buffers(self):
        for _, array in self.named_buffers():
            yield array

    def named_children(self):
        for attr, value in self._members.items():
            if self._kinds[attr] == "module" and value is not None:
                yield attr, value

    def children(self):
        for _, child in self.named_children():
            yield child

    def named_modules(self, prefix="", seen=None):
        """("", self) and then every submodule, depth first, with dotted names."""
        seen = set() if seen is None else seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def apply(self, fn):
        """Call ``fn(module)`` on every submodule and then on self (e.g. custom init)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # ---- gradients and modes -----------------------------------------------------
    def zero_grad(self):
        """Drop every parameter's gradient (``grad = None``)."""
        for param in self.parameters():
            param.grad = None

    def requires_grad_(self, requires_grad=True):
        """Freeze (False) or unfreeze (True) every parameter of this module."""
        for param in self.parameters():
            param.requires_grad_(requires_grad)
        return self

    def train(self, mode=True):
        """Training mode (dropout active, batch norm uses batch statistics), recursively."""
        if not isinstance(mode, bool):
            raise TypeError(f"train(mode) needs a bool, got {mode!r}")
        for module in self.modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    # ---- devices and dtypes ---------------------------------------------------------
    def to(self, device=None, dtype=None):
        """Move (and/or cast) every parameter, gradient and buffer in place; returns self.

        ``model.to("cuda")``, ``model.to("cpu")``, ``model.to(dtype=numpy.float64)``.
        Only floating-point buffers are cast.
        """
        if device is not None:
            backend.check_device(device)
        if dtype is not None:
            dtype = numpy.dtype(dtype)
            if dtype.kind != "f":
                raise ValueError(f"dtype must be a floating-point type, got {dtype}")

        def convert(array, cast):
            if device is not None:
                array = backend.to_device(array, device)
            if cast and dtype is not None and array.dtype != dtype:
                array = array.astype(dtype)
            return array

        for _, owner, attr, kind, value in list(self._walk()):
            if kind == "parameter":
                value.data = convert(value.data, True)
                if value.grad is not None:
                    value.grad = convert(value.grad, True)
            else:
                owner._members[attr] = convert(value, value.dtype.kind == "f")
        return self

    # ---- state ----------------------------------------------------------------------
    def state_dict(self):
        """name -> NumPy copy of every parameter and buffer (frozen ones included)."""
        return {name: _numpy_copy(value.data if kind == "parameter" else value)
                for name, _, _, kind, value in self._walk()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays from ``state_dict`` (name -> array) into this module.

        Each value is cast to the dtype, and moved to the device, of what it
        replaces. Any mis-shaped or non-numeric value is an error; with
        ``strict`` (the default) so is any missing or unexpected name. All
        problems are reported in one ``StateDictError`` and then nothing is
        changed. Returns the (missing, unexpected) names that were skipped.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict needs a mapping name -> array, got {type(state_dict).__name__}")
        targets = {name: (owner, attr, kind, value) for name, owner, attr, kind, value in self._walk()}
        missing = [name for name in targets if name not in state_dict]
        unexpected = [name for name in state_dict if name not in targets]
        mismatched, ready = [], {}
        for name, (_, _, kind, current) in targets.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            if isinstance(value, Tensor):
                value = value.data
            array = backend.to_numpy(value) if _is_array(value) else numpy.asarray(value)
            expected = current.shape
            if array.dtype.kind not in "biuf":
                mismatched.append(f"{name}: dtype {array.dtype} is not numeric")
            elif array.shape != expected:
                mismatched.append(f"{name}: shape {array.shape} given, {expected} expected")
            else:
                ready[name] = array
        if mismatched or (strict and (missing or unexpected)):
            raise StateDictError(type(self).__name__, missing, unexpected, mismatched)
        for name, array in ready.items():
            owner, attr, kind, current = targets[name]
            new = backend.to_device(numpy.array(array, dtype=current.dtype), backend.device_of(
                current.data if kind == "parameter" else current))
            if kind == "parameter":
                current.data = new
            else:
                owner._members[attr] = new
        return LoadResult(missing, unexpected)

    # ---- printing ---------------------------------------------------------------------
    def extra_repr(self):
        """The layer's settings, shown inside the parentheses of its repr."""
        return ""

    def __repr__(self):
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ")" if not lines else head + "\n" + "\n".join(lines) + "\n)"
