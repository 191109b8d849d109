// loss.cu: per-pixel softmax cross-entropy, forward and backward.
//
// Each kernel must equal its NumPy reference, in float32 and float64:
//   softmax_cross_entropy_forward   == minifcn.backend.reference.loss.softmax_cross_entropy_forward(logits, target, ignore_index)
//   softmax_cross_entropy_backward  == minifcn.backend.reference.loss.softmax_cross_entropy_backward(logits, target, logsumexp, ignore_index, scale)
//
// Layouts (C-contiguous): logits and grad_logits (N, K, H, W); target,
// pixel_loss and logsumexp (N, H, W), target int64. Class k of pixel p in
// image n sits at logits[(n*K + k)*HW + p], HW = H*W.
//
//   logsumexp  = log(sum_k exp(logits[k]))                     (every pixel)
//   pixel_loss = log(sum_k exp(logits[k] - max)) - (logits[target] - max), or 0 where ignored
//   grad       = (exp(logits - logsumexp) - onehot(target)) * scale, 0 where ignored
//
// Never a finite loss from broken input: pixel_loss is NaN where a score is
// not finite (even at an ignored pixel), and loss and gradient are NaN where
// a label is neither ignore_index nor in [0, K). The op rejects such labels
// before launching; the kernel only keeps one from reading out of bounds.
//
// Threads (1-D grid-stride loops):
//   forward   one thread per pixel; it loops over the K classes, whose
//             entries are HW apart. Neighbouring threads read neighbouring
//             pixels of the same class, so the reads are coalesced.
//   backward  one thread per element of grad_logits.
#ifndef __CUDACC__
#include "cuda_cpu_shim.h"
#endif

template <typename T>
__global__ void softmax_cross_entropy_forward(const T* __restrict__ logits,
                                              const long long* __restrict__ target,
                                              T* __restrict__ pixel_loss, T* __restrict__ logsumexp,
                                              long long N, long long K, long long HW,
                                              long long ignore_index) {
    const long long total = N * HW;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long n = idx / HW, p = idx % HW;
        const T* scores = logits + n * K * HW + p;  // class k at scores[k * HW]
        // Subtract the largest score before exp, so that no term overflows.
        T largest = scores[0];
        bool all_finite = true;
        for (long long k = 0; k < K; ++k) {
            largest = max(largest, scores[k * HW]);
            all_finite = all_finite && isfinite(scores[k * HW]);
        }
        T sum = 0;
        for (long long k = 0; k < K; ++k) sum += exp(scores[k * HW] - largest);
        const T log_sum = log(sum);
        const long long label = target[idx];
        logsumexp[idx] = largest + log_sum;
        if (!all_finite || (label != ignore_index && (label < 0 || label >= K)))
            pixel_loss[idx] = T(nan(""));
        else if (label == ignore_index)
            pixel_loss[idx] = T(0);
        else
            // both terms small, so the loss keeps its digits when the scores are in the thousands
            pixel_loss[idx] = log_sum - (scores[label * HW] - largest);
    }
}

template <typename T>
__global__ void softmax_cross_entropy_backward(const T* __restrict__ logits,
                                               const long long* __restrict__ target,
                                               const T* __restrict__ logsumexp,
                                               T* __restrict__ grad_logits,
                                               long long N, long long K, long long HW,
                                               long long ignore_index, T scale) {
    const long long total = N * K * HW;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long p = idx % HW, k = (idx / HW) % K, n = idx / (HW * K);
        const long long pixel = n * HW + p;
        const long long label = target[pixel];
        if (label == ignore_index) {
            grad_logits[idx] = T(0);
        } else if (0 <= label && label < K) {
            const T probability = exp(logits[idx] - logsumexp[pixel]);
            grad_logits[idx] = (probability - T(k == label ? 1 : 0)) * scale;
        } else {
            grad_logits[idx] = T(nan(""));
        }
    }
}
