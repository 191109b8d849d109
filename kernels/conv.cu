// conv.cu: im2col and col2im, the two halves of a convolution written as a
// matrix product (minifcn.functional.conv: conv2d = W @ im2col(x), and the
// backward to x, like conv_transpose2d's forward, is col2im(W.T @ grad)).
//
// Each kernel must equal its NumPy reference, in float32 and float64:
//   im2col  == minifcn.functional.conv.im2col(x, kernel_size, stride, padding, dilation)
//   col2im  == minifcn.functional.conv.col2im(cols, x_shape, kernel_size, stride, padding, dilation)
//
// Layouts (C-contiguous):
//   x     (N, C, H, W)
//   cols  (C*kH*kW, N*OH*OW)   row r = (c*kH + i)*kW + j,  column q = (n*OH + oy)*OW + ox
//   cols[r, q] = x[n, c, oy*sH - pH + i*dH, ox*sW - pW + j*dW], or 0 where that is padding
//
// Threads (1-D grid-stride loops, so any grid size covers any tensor):
//   im2col  one thread per element of cols. Neighbouring threads take
//           neighbouring columns q, so the writes to cols are coalesced.
//   col2im  one thread per element of x. It gathers, and sums, every entry of
//           cols that im2col copied from its pixel. Gathering instead of
//           scattering means each output has one writer: no atomics, and the
//           result is the same on every run.
#ifndef __CUDACC__
#include "cuda_cpu_shim.h"
#endif

template <typename T>
__global__ void im2col(const T* __restrict__ x, T* __restrict__ cols,
                       long long N, long long C, long long H, long long W,
                       long long kH, long long kW, long long sH, long long sW,
                       long long pH, long long pW, long long dH, long long dW,
                       long long OH, long long OW) {
    const long long n_cols = N * OH * OW;
    const long long total = C * kH * kW * n_cols;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long r = idx / n_cols, q = idx % n_cols;
        const long long j = r % kW, i = (r / kW) % kH, c = r / (kW * kH);
        const long long ox = q % OW, oy = (q / OW) % OH, n = q / (OW * OH);
        const long long iy = oy * sH - pH + i * dH;
        const long long ix = ox * sW - pW + j * dW;
        const bool inside = 0 <= iy && iy < H && 0 <= ix && ix < W;
        cols[idx] = inside ? x[((n * C + c) * H + iy) * W + ix] : T(0);
    }
}

template <typename T>
__global__ void col2im(const T* __restrict__ cols, T* __restrict__ x,
                       long long N, long long C, long long H, long long W,
                       long long kH, long long kW, long long sH, long long sW,
                       long long pH, long long pW, long long dH, long long dW,
                       long long OH, long long OW) {
    const long long n_cols = N * OH * OW;
    const long long total = N * C * H * W;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long ix = idx % W, iy = (idx / W) % H;
        const long long c = (idx / (W * H)) % C, n = idx / (W * H * C);
        T sum = 0;
        for (long long i = 0; i < kH; ++i) {
            // im2col read row iy for kernel row i at output row oy = (iy + pH - i*dH) / sH,
            // when that division is exact and oy is a real output row.
            const long long ty = iy + pH - i * dH;
            if (ty < 0 || ty % sH != 0 || ty / sH >= OH) continue;
            const long long oy = ty / sH;
            for (long long j = 0; j < kW; ++j) {
                const long long tx = ix + pW - j * dW;
                if (tx < 0 || tx % sW != 0 || tx / sW >= OW) continue;
                const long long ox = tx / sW;
                sum += cols[((c * kH + i) * kW + j) * n_cols + (n * OH + oy) * OW + ox];
            }
        }
        x[idx] = sum;
    }
}
