// crop.cu: the FCN crop layer, cutting an (height, width) window out of every
// channel, and its backward, which puts the window's gradient back in place.
//
// Each kernel must equal its NumPy reference, in float32 and float64:
//   crop_forward   == minifcn.backend.reference.shape.crop_forward(x, offset_h, offset_w, height, width)
//   crop_backward  == minifcn.backend.reference.shape.crop_backward(grad_y, x_shape, offset_h, offset_w)
//
// Layouts (C-contiguous): x and grad_x (N, C, H, W); y and grad_y (N, C, height, width).
//   y[n, c, i, j] = x[n, c, offset_h + i, offset_w + j]
//
// Threads (1-D grid-stride loops):
//   forward   one thread per element of y; it copies its source pixel.
//   backward  one thread per element of grad_x; it copies from grad_y inside
//             the window and writes 0 outside, so grad_x needs no zeroing first.
#ifndef __CUDACC__
#include "cuda_cpu_shim.h"
#endif

template <typename T>
__global__ void crop_forward(const T* __restrict__ x, T* __restrict__ y,
                             long long n_planes, long long H, long long W,
                             long long offset_h, long long offset_w,
                             long long height, long long width) {
    const long long total = n_planes * height * width;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long j = idx % width, i = (idx / width) % height, plane = idx / (width * height);
        y[idx] = x[(plane * H + offset_h + i) * W + offset_w + j];
    }
}

template <typename T>
__global__ void crop_backward(const T* __restrict__ grad_y, T* __restrict__ grad_x,
                              long long n_planes, long long H, long long W,
                              long long offset_h, long long offset_w,
                              long long height, long long width) {
    const long long total = n_planes * H * W;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long ix = idx % W, iy = (idx / W) % H, plane = idx / (W * H);
        const long long i = iy - offset_h, j = ix - offset_w;
        const bool inside = 0 <= i && i < height && 0 <= j && j < width;
        grad_x[idx] = inside ? grad_y[(plane * height + i) * width + j] : T(0);
    }
}
