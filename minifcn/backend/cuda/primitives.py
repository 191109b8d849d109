"""Launch wrappers: one function per NumPy primitive, same name, same arguments.

Shape legend: N batch, C channels, H W input height and width, OH OW output
height and width, K classes, kH kW kernel height and width.

Each function checks its arguments, allocates the output, works out the
launch size and calls one kernel of ``kernels/<family>.cu``. Its NumPy twin,
of the same name in the module given in each section's heading, is the
reference it is tested against (tests/test_kernels.py).

Where the kernel runs follows the data, like ``xp = get_array_module(x)``:
CuPy arrays launch the NVRTC-compiled kernel on the GPU; NumPy arrays run the
same kernel source through the CPU emulator (``cpu_emulation.py``), one
thread at a time. The emulated path is slow and meant for tests and for
reading: the dispatch (minifcn.backend.dispatch) sends CuPy arrays here, and
NumPy arrays only when a test or a user chooses the "cuda" backend.

Kernel arguments are passed as NumPy scalars of the exact C type (int64 for
``long long``, the array's float type for ``T``): a bare Python number would
leave the C type to CuPy's guess.
"""

import numpy

from minifcn.arguments import pair
from minifcn.backend.arrays import get_array_module, is_cuda
from minifcn.backend.cuda import loader
from minifcn.backend.reference.conv import checked_geometry

BLOCK_SIZE = 256
# 65535 blocks of 256 threads is 16.7 million threads, far more than a GPU
# runs at once (an H100 holds about 270 thousand); the grid-stride loops in
# the kernels cover any larger tensor.
MAX_BLOCKS = 65535

FLOAT_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
INTERPOLATE_MODES = ("bilinear", "nearest")


# ---- launching -----------------------------------------------------------------

def launch_size(n):
    """(grid, block) for n work items: one thread each, at most MAX_BLOCKS blocks."""
    return (min(-(-n // BLOCK_SIZE), MAX_BLOCKS),), (BLOCK_SIZE,)


def find_kernel(family, name, dtype, like):
    """The instance of kernel ``name`` for ``dtype``, on the device of the array ``like``."""
    if is_cuda(like):
        return loader.gpu_kernel(family, name, dtype)
    from minifcn.backend.cuda import cpu_emulation

    return cpu_emulation.cpu_module(family).get_function(loader.kernel_expression(name, dtype))


def _launch(family, name, n, like, args):
    """Run kernel ``name`` over n elements, with dtype and device taken from ``like``."""
    if n == 0:
        return  # an empty grid is an error in CUDA, and there is nothing to do
    grid, block = launch_size(n)
    find_kernel(family, name, like.dtype, like)(grid, block, args)


def _i64(*values):
    return tuple(numpy.int64(v) for v in values)


# ---- argument checks -------------------------------------------------------------

def _float_array(a, name, ndim=None):
    """``a`` as a C-contiguous float32/float64 array (a copy only if it was not contiguous)."""
    if not (isinstance(a, numpy.ndarray) or is_cuda(a)):
        raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    return get_array_module(a).ascontiguousarray(a)


def _like(a, name, reference, reference_name, shape=None):
    """``a`` as a contiguous array of ``reference``'s dtype and device (and ``shape``)."""
    a = _float_array(a, name)
    if a.dtype != reference.dtype or is_cuda(a) != is_cuda(reference):
        raise TypeError(f"{name} must match {reference_name} ({reference.dtype} on "
                        f"{'cuda' if is_cuda(reference) else 'cpu'}), got {a.dtype} on "
                        f"{'cuda' if is_cuda(a) else 'cpu'}")
    shape = reference.shape if shape is None else tuple(shape)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    return a


def _int64_array(a, name, shape, like):
    """An integer array as contiguous int64 of ``shape``, on the device of ``like``."""
    if not (isinstance(a, numpy.ndarray) or is_cuda(a)) or a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if is_cuda(a) != is_cuda(like):
        raise TypeError(f"{name} must be on the same device as the float input")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return get_array_module(a).ascontiguousarray(a, dtype=numpy.int64)


def _in_place(a, name, reference=None, reference_name=None):
    """An array the kernel updates in place: it must already be contiguous, since
    a contiguous copy would take the update and leave ``a`` as it was."""
    if getattr(a, "flags", None) is not None and not a.flags.c_contiguous:
        raise ValueError(f"{name} is updated in place and must be C-contiguous")
    return _float_array(a, name) if reference is None else _like(a, name, reference, reference_name)


def _shape4(shape, name):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{name} must be a shape (N, C, H, W) of positive sizes, got {shape}")
    return shape


# ---- conv.cu (NumPy: minifcn.backend.reference.conv) ------------------------------------------


def _conv_output(x_shape, kernel_size, stride, padding, dilation):
    """(OH, OW), by minifcn.functional.conv.conv_output_size's formula."""
    out = tuple((x_shape[2 + a] + 2 * padding[a] - dilation[a] * (kernel_size[a] - 1) - 1)
                // stride[a] + 1 for a in (0, 1))
    if min(out) < 1:
        raise ValueError(f"a {kernel_size} kernel with dilation {dilation} does not fit in an "
                         f"input of size {tuple(x_shape[2:])} padded by {padding}")
    return out


def im2col(x, kernel_size, stride, padding, dilation):
    """x (N, C, H, W) -> cols (C*kH*kW, N*OH*OW), every input window a column."""
    x = _float_array(x, "x", ndim=4)
    geometry = checked_geometry(kernel_size, stride, padding, dilation)
    (kH, kW), (sH, sW), (pH, pW), (dH, dW) = geometry
    N, C, H, W = x.shape
    OH, OW = _conv_output(x.shape, *geometry)
    cols = get_array_module(x).empty((C * kH * kW, N * OH * OW), dtype=x.dtype)
    # one thread per (channel, output pixel), each copying a kH*kW window
    _launch("conv", "im2col", C * N * OH * OW, x,
            (x, cols, *_i64(N, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW)))
    return cols


def col2im(cols, x_shape, kernel_size, stride, padding, dilation):
    """cols (C*kH*kW, N*OH*OW) -> x (N, C, H, W), summing the windows back (im2col's adjoint)."""
    cols = _float_array(cols, "cols", ndim=2)
    N, C, H, W = _shape4(x_shape, "x_shape")
    geometry = checked_geometry(kernel_size, stride, padding, dilation)
    (kH, kW), (sH, sW), (pH, pW), (dH, dW) = geometry
    OH, OW = _conv_output((N, C, H, W), *geometry)
    if cols.shape != (C * kH * kW, N * OH * OW):
        raise ValueError(f"cols must have shape {(C * kH * kW, N * OH * OW)} for x_shape "
                         f"{(N, C, H, W)}, got {tuple(cols.shape)}")
    x = get_array_module(cols).empty((N, C, H, W), dtype=cols.dtype)
    _launch("conv", "col2im", x.size, cols,
            (cols, x, *_i64(N, C, H, W, kH, kW, sH, sW, pH, pW, dH, dW, OH, OW)))
    return x


# ---- pooling.cu (NumPy: minifcn.backend.reference.pooling) ------------------------------------

def pool_output_size(size, kernel, stride, padding, ceil_mode):
    """Output length of max pooling along one axis, exactly as PyTorch computes it."""
    span = size + 2 * padding - (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window would start in the right padding: drop it
    return out


def max_pool2d_forward(x, kernel_size, stride, padding, ceil_mode):
    """x (N, C, H, W) -> (out (N, C, OH, OW), argmax int64 (N, C, OH, OW), iy*W + ix)."""
    x = _float_array(x, "x", ndim=4)
    kH, kW = pair("kernel_size", kernel_size, 1)
    sH, sW = (kH, kW) if stride is None else pair("stride", stride, 1)
    pH, pW = pair("padding", padding, 0)
    if pH > kH // 2 or pW > kW // 2:
        raise ValueError(f"padding must be at most half the kernel size {(kH, kW)}, "
                         f"got {(pH, pW)}")
    N, C, H, W = x.shape
    OH = pool_output_size(H, kH, sH, pH, ceil_mode)
    OW = pool_output_size(W, kW, sW, pW, ceil_mode)
    if min(OH, OW) < 1:
        raise ValueError(f"a {(kH, kW)} pooling window does not fit in an input of size "
                         f"{(H, W)} padded by {(pH, pW)}")
    xp = get_array_module(x)
    out = xp.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = xp.empty((N, C, OH, OW), dtype=numpy.int64)
    _launch("pooling", "max_pool2d_forward", out.size, x,
            (x, out, argmax, *_i64(N, C, H, W, kH, kW, sH, sW, pH, pW, OH, OW)))
    return out, argmax


def max_pool2d_backward(grad_out, argmax, x_shape):
    """grad_out (N, C, OH, OW) -> grad_x (N, C, H, W): each gradient added at its argmax."""
    grad_out = _float_array(grad_out, "grad_out", ndim=4)
    argmax = _int64_array(argmax, "argmax", grad_out.shape, grad_out)
    N, C, H, W = _shape4(x_shape, "x_shape")
    if grad_out.shape[:2] != (N, C):
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x_shape {(N, C, H, W)} "
                         f"must agree on (N, C)")
    grad_x = get_array_module(grad_out).zeros((N, C, H, W), dtype=grad_out.dtype)
    OH, OW = grad_out.shape[2:]
    _launch("pooling", "max_pool2d_backward", grad_out.size, grad_out,
            (grad_out, argmax, grad_x, *_i64(N * C, H * W, OH * OW)))
    return grad_x


# ---- resample.cu (NumPy: minifcn.backend.reference.resample) ----------------------------------

def _bilinear_ratio(in_size, out_size, align_corners, scale):
    """Source step per output pixel for bilinear, as PyTorch computes it."""
    if out_size == in_size:  # PyTorch copies an axis whose size does not change, whatever the scale
        return 1.0
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return 1.0 / scale if scale is not None else in_size / out_size


def _nearest_ratio(in_size, out_size, scale):
    """Source step per output pixel for nearest, in float32 as PyTorch computes it."""
    if out_size == in_size:  # PyTorch copies when the sizes agree ...
        return numpy.float32(1.0)
    if out_size == 2 * in_size:  # ... and halves the index when the output is twice the input
        return numpy.float32(0.5)
    if scale is not None:
        return numpy.float32(1.0 / scale)
    return numpy.float32(in_size) / numpy.float32(out_size)


def _resample(name, source, in_size, out_size, mode, align_corners, scales):
    """Launch the bilinear/nearest kernel `name` from `source` into a new array."""
    if mode not in INTERPOLATE_MODES:
        raise ValueError(f"mode must be one of {INTERPOLATE_MODES}, got {mode!r}")
    (H, W), (OH, OW) = in_size, out_size
    scale_h, scale_w = (None, None) if scales is None else scales
    N, C = source.shape[:2]
    xp = get_array_module(source)
    if name == "forward":
        target = xp.empty((N, C, OH, OW), dtype=source.dtype)
    else:
        target = xp.zeros((N, C, H, W), dtype=source.dtype)  # the kernel adds into it
    n_outputs = N * C * OH * OW  # both directions run one thread per output pixel
    geometry = _i64(N * C, H, W, OH, OW)
    if mode == "bilinear":
        T = source.dtype.type
        ratios = (T(_bilinear_ratio(H, OH, align_corners, scale_h)),
                  T(_bilinear_ratio(W, OW, align_corners, scale_w)), numpy.bool_(align_corners))
    else:
        ratios = (_nearest_ratio(H, OH, scale_h), _nearest_ratio(W, OW, scale_w))
    _launch("resample", f"{mode}_{name}", n_outputs, source, (source, target, *geometry, *ratios))
    return target


def interpolate_forward(x, size, mode, align_corners, scales=None):
    """x (N, C, H, W) -> y (N, C, OH, OW), size = (OH, OW).

    scales: the (h, w) scale factors the caller gave, or None (then in/out).
    """
    x = _float_array(x, "x", ndim=4)
    size = pair("size", size, 1)
    return _resample("forward", x, x.shape[2:], size, mode, bool(align_corners), scales)


def interpolate_backward(grad_y, in_size, mode, align_corners, scales=None):
    """grad_y (N, C, OH, OW) -> grad_x (N, C, H, W), in_size = (H, W)."""
    grad_y = _float_array(grad_y, "grad_y", ndim=4)
    in_size = pair("in_size", tuple(in_size), 1)
    return _resample("backward", grad_y, in_size, grad_y.shape[2:], mode, bool(align_corners),
                     scales)


# ---- loss.cu (NumPy: minifcn.backend.reference.loss) ------------------------------------------

def softmax_cross_entropy_forward(logits, target, ignore_index):
    """logits (N, K, H, W), target (N, H, W) -> (pixel_loss, logsumexp), both (N, H, W)."""
    logits = _float_array(logits, "logits", ndim=4)
    N, K, H, W = logits.shape
    target = _int64_array(target, "target", (N, H, W), logits)
    xp = get_array_module(logits)
    pixel_loss = xp.empty((N, H, W), dtype=logits.dtype)
    logsumexp = xp.empty((N, H, W), dtype=logits.dtype)
    _launch("loss", "softmax_cross_entropy_forward", N * H * W, logits,
            (logits, target, pixel_loss, logsumexp, *_i64(N, K, H * W, ignore_index)))
    return pixel_loss, logsumexp


def softmax_cross_entropy_backward(logits, target, logsumexp, ignore_index, scale):
    """-> grad_logits (N, K, H, W) = (softmax(logits) - onehot(target)) * scale, 0 where ignored.

    scale may be a number or a 0-d array (read once, a device sync for CuPy).
    """
    logits = _float_array(logits, "logits", ndim=4)
    N, K, H, W = logits.shape
    target = _int64_array(target, "target", (N, H, W), logits)
    logsumexp = _like(logsumexp, "logsumexp", logits, "logits", shape=(N, H, W))
    grad_logits = get_array_module(logits).empty_like(logits)
    _launch("loss", "softmax_cross_entropy_backward", logits.size, logits,
            (logits, target, logsumexp, grad_logits, *_i64(N, K, H * W, ignore_index),
             logits.dtype.type(float(scale))))
    return grad_logits


# ---- crop.cu (NumPy: minifcn.backend.reference.shape) -----------------------------------------

def _check_window(x_shape, offset_h, offset_w, height, width):
    H, W = x_shape[2:]
    if min(offset_h, offset_w) < 0 or min(height, width) < 1 \
            or offset_h + height > H or offset_w + width > W:
        raise ValueError(f"crop window at offset ({offset_h}, {offset_w}) of size "
                         f"({height}, {width}) does not fit in an input of size ({H}, {W})")


def crop_forward(x, offset_h, offset_w, height, width):
    """x (N, C, H, W) -> x[:, :, offset_h:offset_h+height, offset_w:offset_w+width], contiguous."""
    x = _float_array(x, "x", ndim=4)
    _check_window(x.shape, offset_h, offset_w, height, width)
    N, C, H, W = x.shape
    y = get_array_module(x).empty((N, C, height, width), dtype=x.dtype)
    _launch("crop", "crop_forward", y.size, x,
            (x, y, *_i64(N * C, H, W, offset_h, offset_w, height, width)))
    return y


def crop_backward(grad_y, x_shape, offset_h, offset_w):
    """grad_y (N, C, height, width) -> grad_x (N, C, H, W): zeros, grad_y in the window."""
    grad_y = _float_array(grad_y, "grad_y", ndim=4)
    N, C, H, W = _shape4(x_shape, "x_shape")
    height, width = grad_y.shape[2:]
    if grad_y.shape[:2] != (N, C):
        raise ValueError(f"grad_y {tuple(grad_y.shape)} and x_shape {(N, C, H, W)} "
                         f"must agree on (N, C)")
    _check_window((N, C, H, W), offset_h, offset_w, height, width)
    grad_x = get_array_module(grad_y).empty((N, C, H, W), dtype=grad_y.dtype)
    _launch("crop", "crop_backward", grad_x.size, grad_y,
            (grad_y, grad_x, *_i64(N * C, H, W, offset_h, offset_w, height, width)))
    return grad_x


# ---- elementwise.cu (NumPy: minifcn.backend.reference.elementwise) --------------

def relu_backward(grad_y, y):
    """grad_y * (y > 0), any shape."""
    grad_y = _float_array(grad_y, "grad_y")
    y = _like(y, "y", grad_y, "grad_y")
    grad_x = get_array_module(grad_y).empty_like(grad_y)
    _launch("elementwise", "relu_backward", grad_y.size, grad_y,
            (grad_y, y, grad_x, numpy.int64(grad_y.size)))
    return grad_x


def dropout_apply(x, keep_mask, scale):
    """x * keep_mask * scale, any shape; keep_mask bool or uint8 of x's shape."""
    x = _float_array(x, "x")
    if getattr(keep_mask, "dtype", None) not in (numpy.dtype(bool), numpy.dtype(numpy.uint8)):
        raise TypeError(f"keep_mask must be a bool or uint8 array, got "
                        f"{getattr(keep_mask, 'dtype', type(keep_mask).__name__)}")
    if tuple(keep_mask.shape) != x.shape or is_cuda(keep_mask) != is_cuda(x):
        raise ValueError(f"keep_mask must have x's shape {x.shape} and device, got "
                         f"{tuple(keep_mask.shape)}")
    keep_mask = get_array_module(keep_mask).ascontiguousarray(keep_mask)  # one byte per element
    y = get_array_module(x).empty_like(x)
    _launch("elementwise", "dropout_apply", x.size, x,
            (x, keep_mask, y, x.dtype.type(scale), numpy.int64(x.size)))
    return y


def sgd_update_(param, grad, velocity, lr, momentum, weight_decay):
    """In place: g = grad + wd*param; v = momentum*v + g; param -= lr*v."""
    param = _in_place(param, "param")
    grad = _like(grad, "grad", param, "param")
    velocity = _in_place(velocity, "velocity", param, "param")
    T = param.dtype.type
    _launch("elementwise", "sgd_update", param.size, param,
            (param, grad, velocity, T(lr), T(momentum), T(weight_decay), numpy.int64(param.size)))


def adam_update_(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """In place: g = grad + wd*param; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
    param -= lr * (m / (1 - b1**step)) / (sqrt(v / (1 - b2**step)) + eps)."""
    param = _in_place(param, "param")
    grad = _like(grad, "grad", param, "param")
    m = _in_place(m, "m", param, "param")
    v = _in_place(v, "v", param, "param")
    T = param.dtype.type
    # The scalar terms in double, as NumPy evaluates them, rounded once to T.
    scalars = (lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
               1.0 - beta1 ** step, 1.0 - beta2 ** step)
    _launch("elementwise", "adam_update", param.size, param,
            (param, grad, m, v, *(T(s) for s in scalars), numpy.int64(param.size)))
