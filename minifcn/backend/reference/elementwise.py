"""Element-wise primitives, the readable reference: ReLU, dropout, optimiser updates.

Shapes: any; every argument of one call has the same shape (a mask may be a
broadcast view).
"""

from minifcn.backend.arrays import get_array_module


def relu(x):
    """max(x, 0); NaN stays NaN, as torch.relu."""
    return get_array_module(x).maximum(x, 0)


def relu_backward(grad_y, y):
    """grad_y * (y > 0): the gradient passes where ReLU let x through (not at x == 0)."""
    return grad_y * (y > 0)


def dropout_apply(x, keep_mask, scale):
    """x * keep_mask * scale, for forward and backward alike. A dropped NaN stays NaN
    (NaN * 0): dropout must not hide a broken activation."""
    return x * keep_mask * scale


def sgd_update_(param, grad, velocity, lr, momentum, weight_decay):
    """In place: g = grad + wd*param; v = momentum*v + g; param -= lr*v."""
    g = grad + weight_decay * param if weight_decay else grad
    if momentum:
        velocity *= momentum
        velocity += g
    else:
        velocity[...] = g
    param -= lr * velocity


def adam_update_(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """In place: g = grad + wd*param; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
    param -= lr * (m / (1 - b1**step)) / (sqrt(v / (1 - b2**step)) + eps)."""
    xp = get_array_module(param)
    g = grad + weight_decay * param if weight_decay else grad
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    m_hat = m / (1.0 - beta1 ** step)
    v_hat = v / (1.0 - beta2 ** step)
    param -= lr * m_hat / (xp.sqrt(v_hat) + eps)
