"""Bad input, table-driven: every row is one wrong call into the public API, the
data readers or the command line, the exception it must raise and the words
the message must contain.

Every answer is an exception minifcn raises itself (a ValueError, TypeError,
... of its own making, never a NumPy, Pillow or json error leaking through),
raised from minifcn's own code, with a message that names the argument, file
or value at fault. The command line prints one "error: ..." line, never a
traceback.
"""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import minifcn as mf
import minifcn.functional as F
from minifcn import backend, nn, optim
from minifcn.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from minifcn.data import DataLoader, DatasetError, SyntheticShapes, VOCSegmentation
from minifcn.data import transforms as T
from minifcn.metrics import SegmentationMetrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "minifcn")
SCRIPT = os.path.join(REPO, "examples", "train_fcn8s.py")
TINY_ARGS = ["--iterations", "1", "--width", "0.0625", "--fc-channels", "16", "--fc6-kernel", "1",
             "--train-size", "4", "--val-size", "1", "--crop", "32", "--batch-size", "2",
             "--conv1-padding", "4", "--no-progress", "--processes", "1"]


def _x(*shape, dtype=np.float32):
    return mf.Tensor(np.zeros(shape, dtype))


def _no_cupy(monkeypatch):
    """Make this machine look like one without CuPy, whatever it has."""
    monkeypatch.setattr(backend.arrays, "_cupy", lambda: None)


# ---- small fixtures for the readers -----------------------------------------------------

def _voc(tmp, image=None, label=None, ids=("a",)):
    """A one-image VOC tree under tmp/voc; ``image`` raw bytes, ``label`` an array or raw bytes."""
    root = tmp / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in ids))
    if image is None:
        Image.fromarray(np.full((4, 5, 3), 128, np.uint8)).save(root / "JPEGImages/a.jpg")
    else:
        (root / "JPEGImages/a.jpg").write_bytes(image)
    if isinstance(label, bytes):
        (root / "SegmentationClass/a.png").write_bytes(label)
    else:
        label = np.zeros((4, 5), np.uint8) if label is None else label
        picture = Image.fromarray(label)
        if label.ndim == 2:
            picture = picture.convert("P")
        picture.save(root / "SegmentationClass/a.png")
    return root


def _truncated_png():
    import io
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 21, (64, 64), dtype=np.uint8)).convert("P").save(
        buffer, format="PNG")
    return buffer.getvalue()[:80]


def _checkpoint_of(tmp, model, name="checkpoint.npz"):
    path = tmp / name
    save_checkpoint(path, model, iteration=1)
    return path


def _with_broken_extra(tmp):
    path = tmp / "broken.npz"
    np.savez(path, **{"meta/format": np.array(1), "meta/extra": np.frombuffer(b"{not json", np.uint8),
                      "meta/rng": np.frombuffer(b"{}", np.uint8)})
    return path


class _Empty:
    def __len__(self):
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


class _NotPairs:
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return np.zeros((8, 8, 3), np.uint8)


# ---- the table: (call(tmp, monkeypatch), exception, message pattern) ----------------------

API = [
    # tensors and autograd
    pytest.param(lambda t, m: mf.Tensor(None), TypeError, "got None", id="tensor-from-None"),
    pytest.param(lambda t, m: mf.Tensor("abc"), ValueError, "cannot make a float32 Tensor from str 'abc'",
                 id="tensor-from-string"),
    pytest.param(lambda t, m: mf.Tensor([[1, 2], [3]]), ValueError, "inhomogeneous", id="tensor-ragged-list"),
    pytest.param(lambda t, m: mf.Tensor(np.zeros(3, np.int64), dtype=np.int64, requires_grad=True), TypeError,
                 "requires_grad needs a float tensor, got dtype int64", id="requires-grad-on-int"),
    pytest.param(lambda t, m: _x(1, 3) + _x(4), ValueError, r"add: shapes \(1, 3\) and \(4,\) cannot be broadcast",
                 id="add-shapes-do-not-broadcast"),
    pytest.param(lambda t, m: _x(2, 3) @ _x(4, 3), ValueError, "matmul: x of shape .2, 3. has 3 columns",
                 id="matmul-inner-sizes"),
    pytest.param(lambda t, m: _x(2, 3).reshape(4, 2), ValueError, r"cannot reshape .* \(2, 3\) .* to \(4, 2\)",
                 id="reshape-wrong-size"),
    pytest.param(lambda t, m: _x(2, 3).mean(axis=(0, -2)), ValueError, "names an axis twice", id="mean-axis-twice"),
    pytest.param(lambda t, m: mf.Tensor(np.ones(3), requires_grad=True).exp().backward(), RuntimeError,
                 r"needs a scalar .*got shape \(3,\)", id="backward-of-a-vector"),
    # devices
    pytest.param(lambda t, m: _x(1).to("tpu"), ValueError, r"device must be one of \('cpu', 'cuda'\), got 'tpu'",
                 id="unknown-device"),
    pytest.param(lambda t, m: (_no_cupy(m), _x(1).to("cuda")), RuntimeError,
                 "'cuda' needs CuPy, which is not installed",
                 id="cuda-without-cupy"),
    pytest.param(lambda t, m: (_no_cupy(m), nn.Conv2d(1, 1, 1).to("cuda")), RuntimeError, "needs CuPy",
                 id="module-to-cuda-without-cupy"),
    # convolution and pooling
    pytest.param(lambda t, m: F.conv2d(_x(3, 5, 5), _x(2, 3, 3, 3)), ValueError,
                 r"conv2d expects x of shape \(N, C_in, H, W\), got shape \(3, 5, 5\)", id="conv2d-3d-input"),
    pytest.param(lambda t, m: F.conv2d(_x(1, 3, 5, 5), _x(2, 4, 3, 3)), ValueError,
                 "has 3 channels but weight .* expects C_in = 4", id="conv2d-channel-mismatch"),
    pytest.param(lambda t, m: F.conv2d(_x(1, 3, 5, 5), _x(2, 3, 3, 3), stride=0), ValueError,
                 "stride must be >= 1, got 0", id="conv2d-zero-stride"),
    pytest.param(lambda t, m: F.conv2d(_x(1, 3, 5, 5), _x(2, 3, 3, 3), padding=-1), ValueError,
                 "padding must be >= 0, got -1", id="conv2d-negative-padding"),
    pytest.param(lambda t, m: F.conv2d(_x(1, 3, 5, 5), _x(2, 3, 7, 7), padding=0), ValueError,
                 "kernel 7x7 .* larger than the padded input 5x5", id="conv2d-kernel-larger-than-input"),
    pytest.param(lambda t, m: F.conv2d(_x(1, 3, 5, 5), _x(2, 3, 3, 3, dtype=np.float64)), TypeError,
                 "must share one dtype, got float32 and float64", id="conv2d-mixed-dtypes"),
    pytest.param(lambda t, m: F.conv_transpose2d(_x(1, 3, 4, 4), _x(3, 2, 3, 3), stride=2, output_padding=2),
                 ValueError, "output_padding 2 must be smaller than stride 2", id="conv-transpose-output-padding"),
    pytest.param(lambda t, m: F.conv_transpose2d(_x(1, 3, 2, 2), _x(3, 2, 3, 3), padding=5), ValueError,
                 r"output size -\d+x-\d+ is not positive", id="conv-transpose-negative-output"),
    pytest.param(lambda t, m: F.max_pool2d(_x(1, 1, 2, 2), 3), ValueError,
                 "kernel 3x3 is larger than the padded input 2x2", id="max-pool-kernel-larger-than-input"),
    pytest.param(lambda t, m: F.max_pool2d(_x(1, 1, 0, 5), 1), ValueError, "padded input 0x5",
                 id="max-pool-empty-input"),
    pytest.param(lambda t, m: F.max_pool2d(_x(1, 1, 4, 4), 2, padding=2), ValueError,
                 "padding 2 must be at most half the kernel size 2", id="max-pool-padding-over-half-kernel"),
    # other ops
    pytest.param(lambda t, m: F.dropout(_x(2, 2), p=1.5), ValueError, r"p must be a probability in \[0, 1\], got 1.5",
                 id="dropout-p-above-1"),
    pytest.param(lambda t, m: F.dropout(_x(2, 2), p=float("nan")), ValueError, "got nan", id="dropout-p-nan"),
    pytest.param(lambda t, m: nn.Dropout2d(-0.1), ValueError, r"p must be a probability in \[0, 1\], got -0.1",
                 id="dropout-layer-negative-p"),
    pytest.param(lambda t, m: F.interpolate(_x(1, 1, 4, 4), size=2, mode="bicubic"), ValueError,
                 r"mode must be one of \('bilinear', 'nearest'\), got 'bicubic'", id="interpolate-unknown-mode"),
    pytest.param(lambda t, m: F.interpolate(_x(1, 1, 4, 4), size=0), ValueError, "size must be a positive int",
                 id="interpolate-zero-size"),
    pytest.param(lambda t, m: F.interpolate(_x(1, 1, 4, 4), size=2, scale_factor=2), ValueError,
                 "exactly one of size and scale_factor", id="interpolate-size-and-scale"),
    pytest.param(lambda t, m: F.softmax_cross_entropy(_x(1, 4, 2, 2), np.zeros((1, 2, 2), np.int64), reduction="max"),
                 ValueError, r"reduction must be one of \('mean', 'sum'\), got 'max'", id="loss-unknown-reduction"),
    pytest.param(lambda t, m: F.softmax_cross_entropy(_x(1, 4, 2, 2), np.zeros((1, 2, 2), np.float32)), TypeError,
                 "target must hold integer class labels, got dtype float32", id="loss-float-labels"),
    pytest.param(lambda t, m: F.softmax_cross_entropy(_x(1, 4, 2, 2), np.full((1, 2, 2), 7)), ValueError,
                 r"target holds label 7 .* labels must lie in \[0, 4\)", id="loss-label-out-of-range"),
    pytest.param(lambda t, m: F.softmax_cross_entropy(_x(1, 4, 2, 2), np.zeros((1, 3, 2), np.int64)), ValueError,
                 r"target has shape \(1, 3, 2\), expected", id="loss-label-shape"),
    pytest.param(lambda t, m: F.batch_norm(_x(2, 3, 2, 2), np.zeros(3), np.ones(3), momentum=2), ValueError,
                 r"momentum must be a number in \[0, 1\], got 2", id="batch-norm-momentum"),
    # layers, models, optimisers
    pytest.param(lambda t, m: nn.Conv2d(3, 0, 3), ValueError, "out_channels must be >= 1, got 0",
                 id="conv-layer-zero-channels"),
    pytest.param(lambda t, m: nn.Conv2d(3, 2, -1), ValueError, "kernel_size must be >= 1, got -1",
                 id="conv-layer-negative-kernel"),
    pytest.param(lambda t, m: nn.MaxPool2d(2, stride=0), ValueError, "stride must be >= 1, got 0",
                 id="pool-layer-zero-stride"),
    pytest.param(lambda t, m: nn.Sequential(nn.ReLU())[3], IndexError, "index 3 out of range for a Sequential of 1",
                 id="sequential-index"),
    pytest.param(lambda t, m: mf.models.fcn8s(width=0.3), ValueError, "width=3/10 does not give a whole",
                 id="fcn-width"),
    pytest.param(lambda t, m: mf.models.fcn8s(backbone="vgg19"), ValueError, "backbone must be one of",
                 id="fcn-unknown-backbone"),
    pytest.param(lambda t, m: nn.Conv2d(3, 2, 3).load_state_dict({"weight": np.zeros((2, 3, 3, 3), np.float32)}),
                 nn.StateDictError, r"missing \(1\): bias", id="state-dict-missing-name"),
    pytest.param(lambda t, m: optim.SGD(nn.Conv2d(1, 1, 1).parameters(), lr=-1), ValueError,
                 r"lr must be a finite number in \[0.0, inf\], got -1", id="sgd-negative-lr"),
    pytest.param(lambda t, m: setattr(optim.Adam(nn.Conv2d(1, 1, 1).parameters()), "lr", float("inf")), ValueError,
                 "lr must be a finite number", id="adam-infinite-lr"),
    pytest.param(lambda t, m: optim.Adam(nn.Conv2d(1, 1, 1).parameters(), betas=(1.0, 0.999)), ValueError,
                 r"beta1 must be a finite number in \[0.0, 1.0\), got 1.0", id="adam-beta1-of-1"),
    pytest.param(lambda t, m: optim.SGD([], lr=0.1), ValueError, "empty list of parameters", id="optimizer-no-params"),
    pytest.param(lambda t, m: SegmentationMetrics(3).update(np.full((2, 2), 5), np.zeros((2, 2), np.int64)),
                 ValueError, r"pred holds class values \[5\] outside \[0, 3\)", id="metrics-prediction-range"),
]

FILES = [
    pytest.param(lambda t, m: load_checkpoint(_checkpoint_of(t, nn.Conv2d(3, 2, 3)), nn.Conv2d(4, 2, 3)),
                 nn.StateDictError, r"(?s)from .*checkpoint.npz into Conv2d.*weight: shape \(2, 3, 3, 3\) given, "
                 r"\(2, 4, 3, 3\) expected", id="checkpoint-of-another-model"),
    pytest.param(lambda t, m: (t.joinpath("c.npz").write_text("hello"), load_checkpoint(t / "c.npz", nn.ReLU())),
                 ValueError, "c.npz' is not an .npz archive", id="checkpoint-text-file"),
    pytest.param(lambda t, m: (t.joinpath("c.npz").write_bytes(_checkpoint_of(t, nn.Conv2d(3, 2, 3), "x.npz")
                                                                .read_bytes()[:300]),
                               load_checkpoint(t / "c.npz", nn.Conv2d(3, 2, 3))),
                 ValueError, "c.npz' is not a readable .npz file", id="checkpoint-truncated"),
    pytest.param(lambda t, m: load_checkpoint(t / "nope.npz", nn.ReLU()), FileNotFoundError,
                 "no such checkpoint or weights file: .*nope.npz", id="checkpoint-missing"),
    pytest.param(lambda t, m: load_checkpoint(t, nn.ReLU()), IsADirectoryError, "got a folder",
                 id="checkpoint-is-a-folder"),
    pytest.param(lambda t, m: load_checkpoint(_with_broken_extra(t), nn.ReLU()), ValueError,
                 "broken.npz': entry 'meta/extra' is not valid JSON", id="checkpoint-broken-metadata"),
    pytest.param(lambda t, m: (save_weights(t / "w.npz", nn.ReLU()), load_checkpoint(t / "w.npz", nn.ReLU())),
                 ValueError, "not a minifcn checkpoint .*use load_weights", id="weights-file-as-checkpoint"),
    pytest.param(lambda t, m: save_checkpoint(t / "no" / "such" / "c.npz", nn.ReLU()), FileNotFoundError,
                 "no such folder", id="save-into-missing-folder"),
    pytest.param(lambda t, m: load_weights(t / "w.pt", nn.ReLU()), ValueError, r"must end in \.npz or \.safetensors",
                 id="weights-unknown-extension"),
    pytest.param(lambda t, m: (t.joinpath("w.safetensors").write_bytes(b"\xff" * 16),
                               load_weights(t / "w.safetensors", nn.ReLU())),
                 ValueError, "w.safetensors' is not a readable .safetensors file", id="safetensors-garbage"),
    # data: the synthetic set, the loader, transforms
    pytest.param(lambda t, m: SyntheticShapes(size=0), ValueError, "size must be a positive int, got 0",
                 id="synthetic-empty"),
    pytest.param(lambda t, m: SyntheticShapes(image_size=8), ValueError, "image_size must be an int >= 16",
                 id="synthetic-tiny-images"),
    pytest.param(lambda t, m: DataLoader(_Empty()), DatasetError, "is empty; a DataLoader needs at least one sample",
                 id="loader-empty-dataset"),
    pytest.param(lambda t, m: DataLoader(SyntheticShapes(size=2), batch_size=0), ValueError,
                 "batch_size must be a positive int, got 0", id="loader-zero-batch"),
    pytest.param(lambda t, m: next(iter(DataLoader(_NotPairs()))), DatasetError,
                 r"dataset\[\d\] must return a pair \(image, label\), got ndarray", id="loader-sample-not-a-pair"),
    pytest.param(lambda t, m: T.RandomCrop(0), ValueError, "size must be >= 1, got 0", id="crop-zero"),
    pytest.param(lambda t, m: T.RandomHorizontalFlip(p=2), ValueError, r"p must be a probability in \[0, 1\], got 2",
                 id="flip-p-above-1"),
    pytest.param(lambda t, m: T.RandomScale((0, 1)), ValueError, "scale_range must be .* 0 < low", id="scale-zero"),
    pytest.param(lambda t, m: T.Normalize("imagenet"), ValueError, "mode must be one of .* got 'imagenet'",
                 id="normalize-unknown-mode"),
    pytest.param(lambda t, m: T.RandomCrop(2)(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8), None),
                 TypeError, "RandomCrop needs rng=numpy.random.Generator", id="transform-without-rng"),
    pytest.param(lambda t, m: T.RandomCrop(2)(np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4), np.uint8),
                                              np.random.default_rng()), ValueError,
                 r"image \(H, W, 3\) and label \(H, W\) of the same size", id="transform-misaligned-pair"),
    # data: the PASCAL VOC reader
    pytest.param(lambda t, m: VOCSegmentation(t / "nowhere"), DatasetError, "nowhere is not a directory",
                 id="voc-missing-root"),
    pytest.param(lambda t, m: VOCSegmentation(_voc(t, ids=())), DatasetError, "lists no image ids",
                 id="voc-empty-split"),
    pytest.param(lambda t, m: VOCSegmentation(_voc(t, image=b"this is not a jpeg"))[0], DatasetError,
                 r"cannot read image file .*a\.jpg", id="voc-non-image-file"),
    pytest.param(lambda t, m: VOCSegmentation(_voc(t, label=_truncated_png()))[0], DatasetError,
                 r"cannot read image file .*a\.png", id="voc-truncated-png"),
    pytest.param(lambda t, m: VOCSegmentation(_voc(t, label=np.full((4, 5), 30, np.uint8)))[0], DatasetError,
                 r"a\.png holds class values \[30\]; expected 0..20 or 255", id="voc-label-out-of-range"),
    pytest.param(lambda t, m: VOCSegmentation(_voc(t, label=np.zeros((4, 5, 3), np.uint8)))[0], DatasetError,
                 "has mode 'RGB'; expected a palette", id="voc-rgb-label"),
    pytest.param(lambda t, m: VOCSegmentation(_voc(t, label=np.zeros((3, 5), np.uint8)))[0], DatasetError,
                 r"a\.png is 5x3 \(WxH\) but image .*a\.jpg is 5x4", id="voc-label-size-mismatch"),
]


def _frames_outside_minifcn(excinfo):
    """The files of the innermost frames, to show where an error came from."""
    return [str(entry.path) for entry in excinfo.traceback[-3:]]


@pytest.mark.parametrize("call, error, pattern", API + FILES)
def test_bad_input_is_named_by_a_minifcn_exception(call, error, pattern, tmp_path, monkeypatch):
    with pytest.raises(error, match=pattern) as excinfo:
        call(tmp_path, monkeypatch)
    exception = excinfo.value
    # minifcn's own exception (or a builtin one it raised), never numpy's, PIL's or json's
    assert type(exception).__module__ in ("builtins",) or type(exception).__module__.startswith("minifcn"), \
        type(exception)
    # raised by minifcn's code, not from deep inside a library it calls
    last = str(excinfo.traceback[-1].path)
    assert last.startswith(PACKAGE + os.sep), _frames_outside_minifcn(excinfo)


def test_the_table_is_long_enough():
    assert len({p.id for p in API + FILES}) == len(API + FILES) >= 60


# ---- the command line ------------------------------------------------------------------

def _script():
    spec = importlib.util.spec_from_file_location("train_fcn8s_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _other_width_checkpoint(tmp, out, monkeypatch):
    assert _script().main([*TINY_ARGS, "--width", "0.125", "--out", str(out)]) == 0


def _out_is_a_file(tmp, out, monkeypatch):
    out.rmdir()
    out.write_text("a file")


def _junk_checkpoint(tmp, out, monkeypatch):
    (out / "checkpoint.npz").write_text("junk")


def _cupy_missing(tmp, out, monkeypatch):
    _no_cupy(monkeypatch)


# (extra arguments, setup(tmp, out, monkeypatch) or None, exit status, pattern of the first error line)
CLI = [
    pytest.param(["--iterations", "0"], None, 1, "error: iterations must be a positive int, got 0",
                 id="zero-iterations"),
    pytest.param(["--iterations", "ten"], None, 2, "error: argument --iterations: invalid int value: 'ten'",
                 id="iterations-not-a-number"),
    pytest.param(["--variant", "4s"], None, 2, "error: argument --variant: invalid choice: '4s'", id="unknown-variant"),
    pytest.param(["--on-nonfinite", "explode"], None, 2, "error: argument --on-nonfinite: invalid choice",
                 id="unknown-on-nonfinite"),
    pytest.param(["--bogus"], None, 2, "error: unrecognized arguments: --bogus", id="unknown-option"),
    pytest.param(["--threads", "0"], None, 2,
                 "error: argument --threads: must be a positive integer, got '0'", id="zero-threads"),
    pytest.param(["--device", "tpu"], None, 1, r"error: device must be one of \('cpu', 'cuda'\), got 'tpu'",
                 id="unknown-device"),
    pytest.param(["--device", "cuda"], _cupy_missing, 1,
                 "error: device 'cuda' needs CuPy, which is not installed", id="cuda-without-cupy"),
    pytest.param(["--lr", "-1"], None, 1, "error: lr must be a positive number, got -1.0", id="negative-lr"),
    pytest.param(["--lr", "nan"], None, 1, "error: lr must be a positive number, got nan", id="nan-lr"),
    pytest.param(["--dropout", "1.5"], None, 1, r"error: dropout must be a probability in \[0, 1\], got 1.5",
                 id="dropout-above-1"),
    pytest.param(["--batch-size", "0"], None, 1, "error: batch_size must be a positive int, got 0", id="zero-batch"),
    pytest.param(["--crop", "-5"], None, 1, "error: crop must be a non-negative int", id="negative-crop"),
    pytest.param(["--width", "0.3"], None, 1, "error: width=3/10 does not give a whole", id="bad-width"),
    pytest.param(["--conv1-padding", "-1"], None, 1, "error: conv1_padding must be a non-negative int, got -1",
                 id="negative-padding"),
    pytest.param(["--seed", "-1"], None, 1, "error: seed must be a non-negative int, got -1", id="negative-seed"),
    pytest.param(["--train-size", "1"], None, 1, "error: drop_last=True with batch_size=2 > len.dataset.=1",
                 id="fewer-images-than-a-batch"),
    pytest.param(["--data", "/no/such/voc"], None, 1, "error: VOC root /no/such/voc is not a directory",
                 id="missing-voc-folder"),
    pytest.param([], _out_is_a_file, 1,
                 "error: out=.* is a file; expected a folder", id="out-is-a-file"),
    pytest.param(["--resume"], _junk_checkpoint, 1,
                 r"error: cannot resume from .*checkpoint.npz: .*checkpoint.npz' is not an .npz archive",
                 id="resume-from-junk"),
    pytest.param(["--resume"], _other_width_checkpoint, 1,
                 "error: cannot resume from .*checkpoint.npz: the checkpoint was written with width=0.125; "
                 "this run has width=0.0625", id="resume-other-model"),
]


@pytest.mark.parametrize("arguments, setup, status, pattern", CLI)
def test_command_line_errors_are_one_line(arguments, setup, status, pattern, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    if setup:
        setup(tmp_path, out, monkeypatch)
    capsys.readouterr()
    try:
        code = _script().main([*TINY_ARGS, "--out", str(out), *arguments])
    except SystemExit as exit:  # argparse's way out
        code = exit.code
    err = capsys.readouterr().err
    assert code == status
    assert "Traceback" not in err
    first = err.splitlines()[0]
    assert re.search(pattern, first), first
    if "--resume" not in arguments:  # (a refused resume lists the details on further lines)
        assert err.count("\n") == 1, err


@pytest.mark.parametrize("arguments, pattern", [
    (["--device", "tpu"], "error: device must be one of"),
    (["--variant", "4s"], "error: argument --variant: invalid choice"),
])
def test_the_real_script_prints_one_error_line(arguments, pattern, tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, *TINY_ARGS, "--out", str(tmp_path / "run"), *arguments],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (1, 2)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(pattern), result.stderr
