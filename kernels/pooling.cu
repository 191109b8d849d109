// pooling.cu: 2-D max pooling, forward (value and position of each window's
// maximum) and backward (gradient routed back to that position).
//
// Each kernel must equal its NumPy reference, in float32 and float64:
//   max_pool2d_forward   == minifcn.backend.reference.pooling.max_pool2d_forward(x, kernel_size, stride, padding, ceil_mode)
//   max_pool2d_backward  == minifcn.backend.reference.pooling.max_pool2d_backward(grad_out, argmax, x_shape)
//
// Layouts (C-contiguous): x and grad_x (N, C, H, W); out, argmax and grad_out
// (N, C, OH, OW). argmax holds iy*W + ix, the flat index of the maximum in its
// own unpadded (H, W) plane. The caller computes OH and OW (PyTorch's rule,
// ceil_mode included) and makes sure every window holds at least one real
// pixel (padding <= kernel/2, as PyTorch requires).
//
// Threads (1-D grid-stride loops):
//   forward   one thread per output element; it scans its window row by row.
//             Padding is skipped, which is the same as padding with -inf.
//   backward  one thread per output element; it adds its gradient at argmax.
//             Overlapping windows (stride < kernel) can pick the same pixel,
//             so the add is an atomicAdd (float64 needs sm_60 or newer).
#ifndef __CUDACC__
#include "cuda_cpu_shim.h"
#endif

template <typename T>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ out,
                                   long long* __restrict__ argmax,
                                   long long N, long long C, long long H, long long W,
                                   long long kH, long long kW, long long sH, long long sW,
                                   long long pH, long long pW, long long OH, long long OW) {
    const long long total = N * C * OH * OW;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long ox = idx % OW, oy = (idx / OW) % OH, plane = idx / (OW * OH);
        const T* x_plane = x + plane * H * W;
        // The window, clipped to the real pixels.
        const long long y0 = oy * sH - pH, x0 = ox * sW - pW;
        const long long y_begin = max(y0, 0LL), y_end = min(y0 + kH, H);
        const long long x_begin = max(x0, 0LL), x_end = min(x0 + kW, W);
        T best = 0;
        long long best_index = -1;
        for (long long iy = y_begin; iy < y_end; ++iy) {
            for (long long ix = x_begin; ix < x_end; ++ix) {
                const T v = x_plane[iy * W + ix];
                // Strict '>' keeps the first maximum in row-major order. A NaN
                // always takes over (PyTorch's rule), so a NaN input propagates
                // to the output and its gradient goes back to the last NaN.
                if (best_index < 0 || v > best || isnan(v)) {
                    best = v;
                    best_index = iy * W + ix;
                }
            }
        }
        out[idx] = best;
        argmax[idx] = best_index;
    }
}

template <typename T>
__global__ void max_pool2d_backward(const T* __restrict__ grad_out,
                                    const long long* __restrict__ argmax, T* __restrict__ grad_x,
                                    long long n_planes, long long plane_in, long long plane_out) {
    // grad_x must be zero on entry; plane_in = H*W and plane_out = OH*OW.
    const long long total = n_planes * plane_out;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long plane = idx / plane_out, position = argmax[idx];
        // max_pool2d_forward's argmax always lies inside its plane; the check
        // only stops a corrupted one from writing outside grad_x.
        if (0 <= position && position < plane_in)
            atomicAdd(&grad_x[plane * plane_in + position], grad_out[idx]);
    }
}
