// resample.cu: resizing an image, bilinear or nearest, forward and backward,
// with PyTorch's rules (F.interpolate, mode "bilinear" with align_corners
// True or False, and mode "nearest").
//
// Each kernel must equal its NumPy reference, in float32 and float64:
//   bilinear_forward, nearest_forward    == minifcn.backend.reference.resample.interpolate_forward(x, size, mode, align_corners, scales)
//   bilinear_backward, nearest_backward  == minifcn.backend.reference.resample.interpolate_backward(grad_y, in_size, mode, align_corners, scales)
//
// Layouts (C-contiguous): x and grad_x (N, C, H, W); y and grad_y (N, C, OH, OW).
//
// Where output pixel o of an axis reads the input (size in -> size out). The
// host passes the ratio, because it depends on how the caller asked for the
// size (PyTorch's rules, see minifcn/functional/resample.py):
//   bilinear, align_corners=True   src = o * ratio,  ratio = (in-1)/(out-1) (0 when out == 1)
//   bilinear, align_corners=False  src = max((o + 0.5) * ratio - 0.5, 0),
//                                  ratio = in/out, or 1/scale_factor when one was given
//       then i0 = floor(src), i1 = min(i0 + 1, in - 1), and i1 weighs src - i0
//   nearest                        src = min(floor(o * ratio), in - 1), in float32
//       whatever the data type (as PyTorch); ratio = in/out or 1/scale_factor,
//       except exactly 1 when out == in and 0.5 when out == 2*in
//
// Threads (1-D grid-stride loops), one per output element in both directions:
//   forward   gathers its 4 (bilinear) or 1 (nearest) input pixels.
//   backward  adds its gradient, times each weight, into those input pixels.
//             Neighbouring outputs share input pixels, so the adds are
//             atomicAdds (float64 needs sm_60 or newer) and the order of the
//             sum, so its last bits, can vary from run to run on the GPU.
#ifndef __CUDACC__
#include "cuda_cpu_shim.h"
#endif

// The two input pixels that output pixel o lies between, and the weight of the second.
template <typename T>
__device__ __forceinline__ void linear_source(long long o, long long in, T ratio, bool align_corners,
                                              long long& i0, long long& i1, T& weight1) {
    T src = align_corners ? T(o) * ratio : (T(o) + T(0.5)) * ratio - T(0.5);
    if (src < T(0)) src = T(0);
    i0 = min((long long)src, in - 1);  // src >= 0, so the cast is floor
    i1 = min(i0 + 1, in - 1);
    weight1 = src - T(i0);
}

__device__ __forceinline__ long long nearest_source(long long o, long long in, float ratio) {
    return min((long long)floorf(float(o) * ratio), in - 1);
}

template <typename T>
__global__ void bilinear_forward(const T* __restrict__ x, T* __restrict__ y,
                                 long long n_planes, long long H, long long W,
                                 long long OH, long long OW,
                                 T ratio_h, T ratio_w, bool align_corners) {
    const long long total = n_planes * OH * OW;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long ox = idx % OW, oy = (idx / OW) % OH, plane = idx / (OW * OH);
        long long y0, y1, x0, x1;
        T wy1, wx1;
        linear_source(oy, H, ratio_h, align_corners, y0, y1, wy1);
        linear_source(ox, W, ratio_w, align_corners, x0, x1, wx1);
        const T wy0 = T(1) - wy1, wx0 = T(1) - wx1;
        const T* p = x + plane * H * W;
        y[idx] = wy0 * (wx0 * p[y0 * W + x0] + wx1 * p[y0 * W + x1]) +
                 wy1 * (wx0 * p[y1 * W + x0] + wx1 * p[y1 * W + x1]);
    }
}

template <typename T>
__global__ void bilinear_backward(const T* __restrict__ grad_y, T* __restrict__ grad_x,
                                  long long n_planes, long long H, long long W,
                                  long long OH, long long OW,
                                  T ratio_h, T ratio_w, bool align_corners) {
    // grad_x must be zero on entry.
    const long long total = n_planes * OH * OW;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long ox = idx % OW, oy = (idx / OW) % OH, plane = idx / (OW * OH);
        long long y0, y1, x0, x1;
        T wy1, wx1;
        linear_source(oy, H, ratio_h, align_corners, y0, y1, wy1);
        linear_source(ox, W, ratio_w, align_corners, x0, x1, wx1);
        const T wy0 = T(1) - wy1, wx0 = T(1) - wx1;
        const T g = grad_y[idx];
        T* p = grad_x + plane * H * W;
        atomicAdd(&p[y0 * W + x0], wy0 * wx0 * g);
        atomicAdd(&p[y0 * W + x1], wy0 * wx1 * g);
        atomicAdd(&p[y1 * W + x0], wy1 * wx0 * g);
        atomicAdd(&p[y1 * W + x1], wy1 * wx1 * g);
    }
}

template <typename T>
__global__ void nearest_forward(const T* __restrict__ x, T* __restrict__ y,
                                long long n_planes, long long H, long long W,
                                long long OH, long long OW, float ratio_h, float ratio_w) {
    const long long total = n_planes * OH * OW;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long ox = idx % OW, oy = (idx / OW) % OH, plane = idx / (OW * OH);
        const long long iy = nearest_source(oy, H, ratio_h), ix = nearest_source(ox, W, ratio_w);
        y[idx] = x[(plane * H + iy) * W + ix];
    }
}

template <typename T>
__global__ void nearest_backward(const T* __restrict__ grad_y, T* __restrict__ grad_x,
                                 long long n_planes, long long H, long long W,
                                 long long OH, long long OW, float ratio_h, float ratio_w) {
    // grad_x must be zero on entry.
    const long long total = n_planes * OH * OW;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long ox = idx % OW, oy = (idx / OW) % OH, plane = idx / (OW * OH);
        const long long iy = nearest_source(oy, H, ratio_h), ix = nearest_source(ox, W, ratio_w);
        atomicAdd(&grad_x[(plane * H + iy) * W + ix], grad_y[idx]);
    }
}
