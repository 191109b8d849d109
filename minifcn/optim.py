"""Optimisers (SGD with momentum, Adam) and learning-rate schedules.

An optimiser holds a list of parameters and, per parameter, its state
(SGD's velocity; Adam's moments m, v and step count), kept on the
parameter's device in its dtype. ``step()`` updates every parameter that
requires grad and has a gradient; the others (frozen, or unused in this
forward pass) are skipped and their state is left alone.

The update rules are the backend's primitives ``sgd_update_`` and
``adam_update_`` (minifcn.backend: the NumPy reference, or a CUDA kernel on
the GPU), which change ``param`` and the state arrays in place and never
touch ``grad``.

Schedules set ``optimizer.lr`` once per iteration: ``PolyLR`` is FCN's
"poly" policy lr * (1 - it/max)^0.9; ``StepLR`` and ``ConstantLR`` are the
usual alternatives.
"""

import math
import numbers

import numpy

from minifcn import backend
from minifcn.tensor import Tensor


# ---- argument checks --------------------------------------------------------------

def _number(name, value, low=0.0, high=math.inf, high_open=False):
    """``value`` as a float in [low, high] (or [low, high)), else ValueError naming it."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


# ---- optimisers -------------------------------------------------------------------

class Optimizer:
    """Base class: a list of parameters, per-parameter state, and a learning rate.

    Subclasses define ``_new_state(param)`` (dict name -> array or int) and
    ``_update(param, grad, state)``; state dicts are keyed by parameter index,
    which is how ``state_dict()`` names them ("3.velocity").
    """

    hyperparameters = ("lr",)

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError("the optimiser got an empty list of parameters")
        for index, param in enumerate(self.params):
            if not isinstance(param, Tensor):
                raise TypeError(f"parameter {index} is a {type(param).__name__}, not a Tensor/Parameter")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("the same parameter appears twice in the optimiser's parameter list")
        self.lr = lr
        self.state = [None] * len(self.params)  # created lazily, on the parameter's device

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _number("lr", value)

    def zero_grad(self):
        for param in self.params:
            param.grad = None

    def step(self):
        """Update every parameter that requires grad and has a gradient."""
        for index, param in enumerate(self.params):
            if not param.requires_grad or param.grad is None:
                continue
            if param.grad.shape != param.shape:
                raise ValueError(f"parameter {index} has shape {param.shape} but its grad has "
                                 f"shape {param.grad.shape}")
            self._update(param, param.grad, self._state(index, param))

    def _state(self, index, param):
        """This parameter's state, created or moved to match its device and dtype."""
        state = self.state[index]
        if state is None:
            state = self.state[index] = self._new_state(param)
        for key, value in state.items():
            if backend.is_cuda(value) or isinstance(value, numpy.ndarray):
                if backend.device_of(value) != param.device:
                    value = backend.to_device(value, param.device)
                state[key] = value.astype(param.dtype, copy=False)
        return state

    def _new_state(self, param):
        raise NotImplementedError

    def _update(self, param, grad, state):
        raise NotImplementedError

    # ---- saving and restoring --------------------------------------------------------
    def state_dict(self):
        """name -> NumPy array: "kind", the hyperparameters, and "<index>.<name>" per parameter."""
        out = {"kind": numpy.array(type(self).__name__),
               "num_params": numpy.array(len(self.params), dtype=numpy.int64)}
        for name in self.hyperparameters:
            out[name] = numpy.array(getattr(self, name), dtype=numpy.float64)
        for index, state in enumerate(self.state):
            for key, value in (state or {}).items():
                out[f"{index}.{key}"] = (value.get() if backend.is_cuda(value) else numpy.array(value, copy=True))
        return out

    def load_state_dict(self, state_dict):
        """Restore what ``state_dict()`` saved; checks everything before changing anything."""
        problems = self.check_state_dict(state_dict)
        if problems:
            raise ValueError(f"cannot load optimiser state into {type(self).__name__}:\n  " + "\n  ".join(problems))
        for name in self.hyperparameters:
            setattr(self, name, float(state_dict[name]))
        self.state = [None] * len(self.params)
        for key, value in state_dict.items():
            if "." in key:
                index, name = key.split(".", 1)
                param = self.params[int(index)]
                if self.state[int(index)] is None:
                    self.state[int(index)] = {}
                if name == "step":
                    self.state[int(index)][name] = int(value)
                else:
                    self.state[int(index)][name] = backend.to_device(numpy.array(value, dtype=param.dtype),
                                                                     param.device)

    def check_state_dict(self, state_dict):
        """Every problem with ``state_dict`` as a list of lines (empty when it fits)."""
        problems = []
        kind = str(state_dict.get("kind", "?"))
        if kind != type(self).__name__:
            return [f"the state is from a {kind} optimiser, not {type(self).__name__}"]
        num_params = int(state_dict.get("num_params", -1))
        if num_params != len(self.params):
            problems.append(f"the state is for {num_params} parameters, this optimiser has {len(self.params)}")
        for name in self.hyperparameters:
            value = state_dict.get(name)
            if value is None or numpy.shape(value) != () or not 0 <= float(value) < math.inf:
                problems.append(f"hyperparameter {name!r} is missing or not a non-negative number: {value!r}")
        expected_keys = self._new_state_keys()
        found = {}  # parameter index -> names of its state entries
        for key, value in state_dict.items():
            if key in ("kind", "num_params") or key in self.hyperparameters:
                continue
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) >= len(self.params) or name not in expected_keys:
                problems.append(f"unexpected entry {key!r}")
                continue
            found.setdefault(int(index), set()).add(name)
            shape = () if name == "step" else self.params[int(index)].shape
            if numpy.shape(value) != shape:
                problems.append(f"{key}: shape {numpy.shape(value)} given, {shape} expected")
        for index, names in sorted(found.items()):
            for name in expected_keys:
                if name not in names:
                    problems.append(f"missing entry '{index}.{name}'")
        return problems

    def _new_state_keys(self):
        raise NotImplementedError

    def __repr__(self):
        settings = ", ".join(f"{name}={getattr(self, name)}" for name in self.hyperparameters)
        return f"{type(self).__name__}({len(self.params)} parameters, {settings})"


class SGD(Optimizer):
    """Stochastic gradient descent with momentum and L2 weight decay (Caffe's SGD solver):

        g = grad + weight_decay * param;  v = momentum * v + g;  param -= lr * v
    """

    hyperparameters = ("lr", "momentum", "weight_decay")

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum = _number("momentum", momentum, 0.0, 1.0, high_open=True)
        self.weight_decay = _number("weight_decay", weight_decay)

    def _new_state(self, param):
        return {"velocity": backend.get_array_module(param.data).zeros_like(param.data)}

    def _new_state_keys(self):
        return ("velocity",)

    def _update(self, param, grad, state):
        backend.primitives(param.data).sgd_update_(param.data, grad, state["velocity"], self.lr, self.momentum,
                                                   self.weight_decay)


class Adam(Optimizer):
    """Adam: running means of the gradient (m) and of its square (v), bias-corrected:

        m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
        param -= lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
    """

    hyperparameters = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.beta1 = _number("beta1", betas[0], 0.0, 1.0, high_open=True)
        self.beta2 = _number("beta2", betas[1], 0.0, 1.0, high_open=True)
        self.eps = _number("eps", eps)
        if self.eps == 0:
            raise ValueError("eps must be positive (it keeps the update finite where v is 0), got 0")
        self.weight_decay = _number("weight_decay", weight_decay)

    @property
    def betas(self):
        return self.beta1, self.beta2

    def _new_state(self, param):
        xp = backend.get_array_module(param.data)
        return {"m": xp.zeros_like(param.data), "v": xp.zeros_like(param.data), "step": 0}

    def _new_state_keys(self):
        return ("m", "v", "step")

    def _update(self, param, grad, state):
        state["step"] += 1
        args = (param.data, grad, state["m"], state["v"], self.lr, self.beta1, self.beta2, self.eps,
                self.weight_decay, state["step"])
        backend.primitives(param.data).adam_update_(*args)


# ---- learning-rate schedules --------------------------------------------------------

def poly_lr(base_lr, iteration, max_iterations, power=0.9):
    """FCN's "poly" policy: base_lr * (1 - iteration/max_iterations)^power, 0 from max on."""
    return base_lr * max(0.0, 1.0 - iteration / max_iterations) ** power


def step_lr(base_lr, iteration, step_size, gamma=0.1):
    """base_lr * gamma^(iteration // step_size): divide by 10 every step_size iterations."""
    return base_lr * gamma ** (iteration // step_size)


def constant_lr(base_lr, iteration):
    return base_lr


class LRScheduler:
    """Sets ``optimizer.lr = schedule(base_lr, iteration)``; call ``step()`` once per iteration.

        for it in range(max_iterations):
            ...; optimizer.step(); scheduler.step()

    The learning rate is set at construction (iteration 0) and after each
    step. ``state_dict()`` is a small JSON-serialisable dict for checkpoints.
    """

    def __init__(self, optimizer, base_lr=None):
        self.optimizer = optimizer
        self.base_lr = _number("base_lr", optimizer.lr if base_lr is None else base_lr)
        self.iteration = 0
        self.optimizer.lr = self.lr_at(0)

    def lr_at(self, iteration):
        raise NotImplementedError

    def step(self):
        self.iteration += 1
        self.optimizer.lr = self.lr_at(self.iteration)
        return self.optimizer.lr

    def state_dict(self):
        return {"iteration": self.iteration, "base_lr": self.base_lr}

    def load_state_dict(self, state):
        self.iteration = int(state["iteration"])
        self.base_lr = _number("base_lr", state["base_lr"])
        self.optimizer.lr = self.lr_at(self.iteration)


class PolyLR(LRScheduler):
    def __init__(self, optimizer, max_iterations, power=0.9, base_lr=None):
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, numbers.Integral) or max_iterations < 1:
            raise ValueError(f"max_iterations must be a positive int, got {max_iterations!r}")
        self.max_iterations, self.power = int(max_iterations), _number("power", power)
        super().__init__(optimizer, base_lr)

    def lr_at(self, iteration):
        return poly_lr(self.base_lr, iteration, self.max_iterations, self.power)


class StepLR(LRScheduler):
    def __init__(self, optimizer, step_size, gamma=0.1, base_lr=None):
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) or step_size < 1:
            raise ValueError(f"step_size must be a positive int, got {step_size!r}")
        self.step_size, self.gamma = int(step_size), _number("gamma", gamma)
        super().__init__(optimizer, base_lr)

    def lr_at(self, iteration):
        return step_lr(self.base_lr, iteration, self.step_size, self.gamma)


class ConstantLR(LRScheduler):
    def lr_at(self, iteration):
        return constant_lr(self.base_lr, iteration)
