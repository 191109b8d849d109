// conv.cu: im2col and col2im, the two halves of a convolution written as a
// matrix product (minifcn.backend.reference.conv: conv2d = W @ im2col(x), and the
// backward to x, like conv_transpose2d's forward, is col2im(W.T @ grad)).
//
// Each kernel must equal its NumPy reference, in float32 and float64:
//   im2col  == minifcn.backend.reference.conv.im2col(x, kernel_size, stride, padding, dilation)
//   col2im  == minifcn.backend.reference.conv.col2im(cols, x_shape, kernel_size, stride, padding, dilation)
//
// Layouts (C-contiguous):
//   x     (N, C, H, W)
//   cols  (C*kH*kW, N*OH*OW)   row r = (c*kH + i)*kW + j,  column q = (n*OH + oy)*OW + ox
//   cols[r, q] = x[n, c, oy*sH - pH + i*dH, ox*sW - pW + j*dW], or 0 where that is padding
//
// Threads (1-D grid-stride loops, so any grid size covers any tensor):
//   im2col  one thread per (channel c, output pixel q): it copies the kH*kW
//           window of that pixel into column q. Splitting a flat index into
//           (c, n, oy, ox) takes integer divisions, slow on a GPU, so each
//           thread does it once for kH*kW copies. For each tap, neighbouring
//           threads write neighbouring columns: the writes are coalesced.
//   col2im  one thread per element of x. It gathers, and sums, every entry of
//           cols that im2col copied from its pixel, visiting only the output
//           pixels whose window reaches it (about (kH/sH)*(kW/sW) of them: 4
//           for FCN's 64x64, stride-32 upsampling, not 4096). Gathering
//           instead of scattering gives each output one writer: no atomics,
//           the same result on every run, and taps summed in the order
//           NumPy sums them.
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
    const long long total = C * n_cols;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long c = idx / n_cols, q = idx % n_cols;
        const long long ox = q % OW, oy = (q / OW) % OH, n = q / (OW * OH);
        const T* x_plane = x + (n * C + c) * H * W;
        T* column = cols + c * kH * kW * n_cols + q;  // row c*kH*kW of column q
        for (long long i = 0; i < kH; ++i) {
            const long long iy = oy * sH - pH + i * dH;
            for (long long j = 0; j < kW; ++j) {
                const long long ix = ox * sW - pW + j * dW;
                const bool inside = 0 <= iy && iy < H && 0 <= ix && ix < W;
                column[(i * kW + j) * n_cols] = inside ? x_plane[iy * W + ix] : T(0);
            }
        }
    }
}

// The kernel tap t with t * dilation == offset, or -1 when there is none
// (the dilated window steps over that row or column).
__device__ __forceinline__ long long tap_at(long long offset, long long dilation) {
    if (dilation == 1) return offset;  // the common case, without a division
    return offset % dilation == 0 ? offset / dilation : -1;
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
        // In padded coordinates the window of output row oy covers rows
        // oy*sH + i*dH, i < kH. So the rows oy that reach row yp = iy + pH run
        // from ceil((yp - (kH-1)*dH) / sH) to floor(yp / sH); columns alike.
        const long long yp = iy + pH, xp = ix + pW;
        const long long reach_h = (kH - 1) * dH, reach_w = (kW - 1) * dW;
        const long long oy_first = yp < reach_h ? 0 : (yp - reach_h + sH - 1) / sH;
        const long long ox_first = xp < reach_w ? 0 : (xp - reach_w + sW - 1) / sW;
        const long long oy_last = min(yp / sH, OH - 1), ox_last = min(xp / sW, OW - 1);
        T sum = 0;
        // Walking oy (and ox) downwards walks the taps i (and j) upwards.
        for (long long oy = oy_last; oy >= oy_first; --oy) {
            const long long i = tap_at(yp - oy * sH, dH);
            if (i < 0) continue;
            for (long long ox = ox_last; ox >= ox_first; --ox) {
                const long long j = tap_at(xp - ox * sW, dW);
                if (j < 0) continue;
                sum += cols[((c * kH + i) * kW + j) * n_cols + (n * OH + oy) * OW + ox];
            }
        }
        x[idx] = sum;
    }
}
