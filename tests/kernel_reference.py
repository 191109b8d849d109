"""Test-local NumPy references for kernels whose package reference is not written yet.

tests/test_kernels.py compares each CUDA kernel with the NumPy primitive of
the same name in minifcn (minifcn.functional.*, minifcn.optim). Until such a
primitive exists, the function here stands in for it, written from the
contract (the same names, arguments and results). Delete an entry once the
package has its own.
"""

import numpy as np


def softmax_cross_entropy_forward(logits, target, ignore_index):
    """logits (N, K, H, W), target (N, H, W) -> (pixel_loss, logsumexp), both (N, H, W).

    logsumexp = log(sum_k exp(logits[:, k])); pixel_loss = logsumexp - logits[target],
    0 where target == ignore_index.
    """
    largest = logits.max(axis=1)
    logsumexp = largest + np.log(np.exp(logits - largest[:, None]).sum(axis=1))
    ignored = target == ignore_index
    label = np.where(ignored, 0, target)
    picked = np.take_along_axis(logits, label[:, None], axis=1)[:, 0]
    pixel_loss = np.where(ignored, 0, logsumexp - picked).astype(logits.dtype)
    return pixel_loss, logsumexp.astype(logits.dtype)


def softmax_cross_entropy_backward(logits, target, logsumexp, ignore_index, scale):
    """(exp(logits - logsumexp) - onehot(target)) * scale, 0 for ignored pixels; (N, K, H, W)."""
    K = logits.shape[1]
    ignored = target == ignore_index
    onehot = np.arange(K).reshape(1, K, 1, 1) == target[:, None]
    grad = (np.exp(logits - logsumexp[:, None]) - onehot) * logits.dtype.type(scale)
    return np.where(ignored[:, None], 0, grad).astype(logits.dtype)
