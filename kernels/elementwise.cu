// elementwise.cu: the element-by-element steps that are not plain NumPy
// expressions worth a library call: ReLU's backward, applying a dropout mask,
// and the SGD-with-momentum and Adam parameter updates (in place).
//
// Each kernel must equal its NumPy reference, in float32 and float64:
//   relu_backward  == minifcn.backend.reference.elementwise.relu_backward(grad_y, y)
//   dropout_apply  == minifcn.backend.reference.elementwise.dropout_apply(x, keep_mask, scale)
//   sgd_update     == minifcn.backend.reference.elementwise.sgd_update_(param, grad, velocity, lr, momentum, weight_decay)
//   adam_update    == minifcn.backend.reference.elementwise.adam_update_(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
//
// All arrays are C-contiguous and of one shape with n elements; keep_mask is
// one byte per element (bool or uint8). Threads: one per element, 1-D
// grid-stride loops. Each line does the NumPy expression's operations in the
// same order, so float32 results match NumPy to the last bit or two.
#ifndef __CUDACC__
#include "cuda_cpu_shim.h"
#endif

template <typename T>
__global__ void relu_backward(const T* __restrict__ grad_y, const T* __restrict__ y,
                              T* __restrict__ grad_x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        // grad_y * (y > 0) as a product, not a select: a NaN or inf in grad_y
        // gives NaN where y <= 0, exactly as in NumPy.
        grad_x[i] = grad_y[i] * T(y[i] > T(0));
    }
}

template <typename T>
__global__ void dropout_apply(const T* __restrict__ x, const unsigned char* __restrict__ keep_mask,
                              T* __restrict__ y, T scale, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        y[i] = x[i] * T(keep_mask[i] != 0) * scale;  // x * keep_mask * scale
    }
}

// Like the NumPy reference, a zero weight_decay or momentum leaves its term
// out rather than multiplying by 0, so an inf in param or velocity does not
// turn into NaN through 0 * inf.
template <typename T>
__global__ void sgd_update(T* __restrict__ param, const T* __restrict__ grad,
                           T* __restrict__ velocity, T lr, T momentum, T weight_decay,
                           long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const T g = weight_decay != T(0) ? grad[i] + weight_decay * param[i] : grad[i];
        const T v = momentum != T(0) ? velocity[i] * momentum + g : g;
        velocity[i] = v;
        param[i] -= lr * v;
    }
}

// The host computes, in double as the NumPy reference does, one_minus_beta1 =
// 1 - beta1, one_minus_beta2 = 1 - beta2 and the bias corrections
// 1 - beta1**step and 1 - beta2**step.
template <typename T>
__global__ void adam_update(T* __restrict__ param, const T* __restrict__ grad,
                            T* __restrict__ m, T* __restrict__ v, T lr,
                            T beta1, T one_minus_beta1, T beta2, T one_minus_beta2,
                            T eps, T weight_decay, T bias_correction1, T bias_correction2,
                            long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const T g = weight_decay != T(0) ? grad[i] + weight_decay * param[i] : grad[i];
        const T m_i = m[i] * beta1 + one_minus_beta1 * g;
        const T v_i = v[i] * beta2 + one_minus_beta2 * (g * g);
        m[i] = m_i;
        v[i] = v_i;
        const T m_hat = m_i / bias_correction1, v_hat = v_i / bias_correction2;
        param[i] -= lr * m_hat / (sqrt(v_hat) + eps);
    }
}
