"""Checkpoints (model + optimiser + your own values) and weight files, with no pickle.

A checkpoint is one ``.npz`` file (a zip of ``.npy`` arrays):

    model/<name>       every entry of model.state_dict()      ("model/conv1_1.weight")
    optim/<key>        every entry of optimizer.state_dict()  ("optim/3.velocity")
    meta/format        int, the layout version (1)
    meta/extra         the **extra keyword values, as JSON text in a uint8 array
    meta/rng           minifcn.nn.init.get_rng_state(), as JSON text

It is read back with ``numpy.load(allow_pickle=False)``, so a file cannot
run code, and written atomically: to a temporary file in the same folder,
flushed to disk, then renamed over the target, so a crash mid-write leaves
the previous checkpoint intact.

Weight files (``save_weights``/``load_weights``) hold only a state dict, as
``.npz`` or ``.safetensors`` (chosen by the file's extension).
"""

import errno
import json
import os
import tempfile
import zipfile

import numpy

from minifcn.nn import init
from minifcn.nn.module import StateDictError

FORMAT_VERSION = 1
_MODEL, _OPTIM, _META = "model/", "optim/", "meta/"


# ---- writing --------------------------------------------------------------------

def atomic_write(path, write):
    """Call ``write(temporary_path)``, fsync the file, then rename it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "cannot write there: no such folder", folder)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would have
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _json_array(value, what):
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from None
    return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8)


def _write_npz(path, arrays):
    with open(path, "wb") as f:
        numpy.savez(f, **arrays)


def save_checkpoint(path, model, optimizer=None, **extra):
    """Write ``model`` (and ``optimizer``, and ``extra`` values) to the ``.npz`` file ``path``.

    ``extra`` values must be JSON-serialisable (e.g. iteration=1200, best_miou=0.63,
    scheduler=scheduler.state_dict()); they come back from ``load_checkpoint``.
    """
    for key, value in extra.items():
        _json_array(value, f"checkpoint value {key!r}")
    arrays = {f"{_MODEL}{name}": array for name, array in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"{_OPTIM}{key}": array for key, array in optimizer.state_dict().items()})
    arrays[f"{_META}format"] = numpy.array(FORMAT_VERSION, dtype=numpy.int64)
    arrays[f"{_META}extra"] = _json_array(extra, "checkpoint extras")
    arrays[f"{_META}rng"] = _json_array(init.get_rng_state(), "the random state")
    atomic_write(path, lambda tmp: _write_npz(tmp, arrays))


# ---- reading ----------------------------------------------------------------------

def _read_npz(path):
    """Every array of the ``.npz`` at ``path``, refusing pickled content."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "expected a checkpoint or weights file, got a folder", path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint or weights file", path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # every .npz is a zip archive (the second: an empty one)
        looks_like = " (it looks like a pickle)" if magic[:1] == b"\x80" else ""
        raise ValueError(f"{path!r} is not an .npz archive{looks_like}")
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ValueError(f"refusing to load {path!r}: it contains pickled Python objects, which could "
                             "run code when loaded; minifcn files hold only numeric arrays") from None
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path!r} is not a readable .npz file: {err}") from None
    # numpy hands back the raw bytes of a member that is not a .npy array (e.g. the
    # data.pkl of a PyTorch zip checkpoint); such bytes are never unpickled, only refused.
    others = sorted(key for key, value in arrays.items() if not isinstance(value, numpy.ndarray))
    if others:
        raise ValueError(f"refusing to load {path!r}: members {others} are not .npy arrays (is it a "
                         "PyTorch or other zip file?); minifcn files hold only numeric arrays")
    return arrays


def _json_value(arrays, key, path):
    """The JSON value stored as UTF-8 bytes in ``arrays[key]``; ValueError naming the file if broken."""
    if key not in arrays:
        raise ValueError(f"{os.fspath(path)!r} is not a complete minifcn checkpoint: it has no {key!r} entry")
    array = arrays[key]
    try:
        if array.dtype != numpy.uint8 or array.ndim != 1:
            raise ValueError(f"expected a 1-d uint8 array, got {array.dtype} of shape {array.shape}")
        return json.loads(bytes(array).decode("utf-8"))
    except ValueError as err:  # also UnicodeDecodeError and json.JSONDecodeError
        raise ValueError(f"{os.fspath(path)!r}: entry {key!r} is not valid JSON text: {err}") from None


def _split(arrays, prefix):
    return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}


def load_checkpoint(path, model, optimizer=None, restore_rng=False):
    """Restore ``model`` (and ``optimizer``) from ``path``; returns the saved extras.

    The model state must fit exactly (``StateDictError`` lists every
    difference otherwise), and both model and optimiser are checked before
    either is changed. With ``restore_rng`` the shared random stream
    (``minifcn.nn.init``) continues where it was when the checkpoint was
    written, so a resumed run draws the same dropout masks.
    """
    arrays = _read_npz(path)
    if f"{_META}format" not in arrays:
        raise ValueError(f"{os.fspath(path)!r} is not a minifcn checkpoint (no meta/format entry); "
                         "for a plain weights file use load_weights")
    version = arrays[f"{_META}format"]
    version = int(version) if version.shape == () and version.dtype.kind in "iu" else repr(version)
    if version != FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)!r} has checkpoint format {version}; this minifcn reads {FORMAT_VERSION}")
    model_state, optim_state = _split(arrays, _MODEL), _split(arrays, _OPTIM)
    extra = _json_value(arrays, f"{_META}extra", path)
    rng_state = _json_value(arrays, f"{_META}rng", path) if restore_rng else None
    if optimizer is not None:
        if not optim_state:
            raise ValueError(f"{os.fspath(path)!r} holds no optimiser state; load it with optimizer=None")
        problems = optimizer.check_state_dict(optim_state)
        if problems:
            raise ValueError(f"cannot load the optimiser state from {os.fspath(path)!r}:\n  " + "\n  ".join(problems))
    try:
        model.load_state_dict(model_state)
    except StateDictError as err:
        raise err.with_source(os.fspath(path)) from None
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    if restore_rng:
        init.set_rng_state(rng_state)
    return extra


def read_checkpoint_extra(path):
    """The ``**extra`` values saved with a checkpoint, without loading a model
    (e.g. the training config, to rebuild the right model before loading it)."""
    arrays = _read_npz(path)
    if f"{_META}extra" not in arrays:
        raise ValueError(f"{os.fspath(path)!r} is not a minifcn checkpoint (no meta/extra entry)")
    return _json_value(arrays, f"{_META}extra", path)


# ---- weight files (.npz or .safetensors) --------------------------------------------

def _weights_format(path):
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in (".npz", ".safetensors"):
        raise ValueError(f"weights file must end in .npz or .safetensors, got {os.fspath(path)!r}")
    return ext


def save_weights(path, model):
    """Write ``model.state_dict()`` to ``path`` (.npz or .safetensors), atomically."""
    state = model.state_dict()
    if _weights_format(path) == ".safetensors":
        from safetensors.numpy import save_file
        atomic_write(path, lambda tmp: save_file({k: numpy.ascontiguousarray(v) for k, v in state.items()}, tmp))
    else:
        atomic_write(path, lambda tmp: _write_npz(tmp, state))


def load_weights(path, model, strict=True):
    """Load a state dict from ``path`` (.npz or .safetensors) into ``model``.

    A checkpoint ``.npz`` works too: its model part is used. With
    ``strict=False`` missing and unexpected names are skipped (e.g. loading a
    classifier's backbone into an FCN) and returned as (missing, unexpected).
    """
    if _weights_format(path) == ".safetensors":
        if not os.path.isfile(os.fspath(path)):
            raise FileNotFoundError(errno.ENOENT, "no such weights file", os.fspath(path))
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            state = load_file(os.fspath(path))
        except (SafetensorError, ValueError, TypeError, OSError) as err:
            raise ValueError(f"{os.fspath(path)!r} is not a readable .safetensors file: {err}") from None
    else:
        state = _read_npz(path)
        if f"{_META}format" in state:
            state = _split(state, _MODEL)
    try:
        return model.load_state_dict(state, strict=strict)
    except StateDictError as err:
        raise err.with_source(os.fspath(path)) from None
