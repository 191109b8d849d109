// cuda_cpu_shim.h: just enough CUDA for g++ to compile a kernels/*.cu file as
// plain C++, so that the CPU test suite runs the very same kernel source that
// CuPy compiles for the GPU (see minifcn/backend/cuda/cpu_emulation.py).
//
// How the emulation works:
//   * __global__ and __device__ vanish, so a kernel is an ordinary function.
//   * threadIdx, blockIdx, blockDim and gridDim are thread_local globals.
//     cuda_cpu::launch() walks over every block and every thread of the grid,
//     sets them, and calls the kernel once: one call = one CUDA thread.
//   * Those calls run one after another, never at the same time. So atomicAdd
//     is a plain read-add-write and __syncthreads() has nothing to wait for.
//     __shared__ is deliberately left undefined: a kernel whose threads talk
//     through shared memory needs real concurrency, and should fail to compile
//     here rather than compute something the GPU would not.
//   * The CUDA math library overloads exp, log, sqrt, ... for float and
//     double, and so does <cmath>; min and max behave as CUDA's.
//
// A .cu file includes this header only when it is not compiled by a CUDA
// compiler (nvcc and NVRTC define __CUDACC__), so CuPy never sees it.
#ifndef MINIFCN_CUDA_CPU_SHIM_H
#define MINIFCN_CUDA_CPU_SHIM_H

#include <cmath>
#include <cstddef>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
typedef dim3 uint3;

// The built-in variables of a CUDA thread, set by cuda_cpu::launch before each call.
static thread_local uint3 threadIdx;
static thread_local uint3 blockIdx;
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;

inline void __syncthreads() {}  // threads run one at a time: nothing to wait for

template <typename T>
inline T atomicAdd(T* address, T value) {  // threads run one at a time: a plain add is atomic
    T old = *address;
    *address = old + value;
    return old;
}

// CUDA's min and max: fminf/fmaxf for floating point (a NaN loses to a number), plain
// comparisons for integers.
template <typename T>
inline T min(T a, T b) {
    if constexpr (std::is_floating_point<T>::value) return std::fmin(a, b);
    else return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
    if constexpr (std::is_floating_point<T>::value) return std::fmax(a, b);
    else return a < b ? b : a;
}

using std::exp;
using std::floor;
using std::isfinite;
using std::isnan;
using std::log;
using std::nan;
using std::sqrt;

namespace cuda_cpu {

// Call kernel(args...) where args[i] points at the value of parameter i: the
// same packing as cudaLaunchKernel and as CuPy's kernel(grid, block, args).
template <typename... Args, std::size_t... I>
void call_with_packed_args(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<Args>*>(args[I])...);
}

// Run every thread of a grid x block launch, one after another.
template <typename... Args>
void launch(void (*kernel)(Args...), dim3 grid, dim3 block, void** args) {
    gridDim = grid;
    blockDim = block;
    for (blockIdx.z = 0; blockIdx.z < grid.z; ++blockIdx.z)
        for (blockIdx.y = 0; blockIdx.y < grid.y; ++blockIdx.y)
            for (blockIdx.x = 0; blockIdx.x < grid.x; ++blockIdx.x)
                for (threadIdx.z = 0; threadIdx.z < block.z; ++threadIdx.z)
                    for (threadIdx.y = 0; threadIdx.y < block.y; ++threadIdx.y)
                        for (threadIdx.x = 0; threadIdx.x < block.x; ++threadIdx.x)
                            call_with_packed_args(kernel, args, std::index_sequence_for<Args...>{});
}

// Describe one parameter type as (is_pointer, kind, size), kind in NumPy's
// dtype.kind letters ('f' float, 'i' signed, 'u' unsigned, 'b' bool) and size
// that of the value or of the element pointed to. The Python side checks each
// argument against this, which a real GPU launch never does for you.
template <typename A>
void describe(long long* entry) {
    using Value = std::remove_cv_t<std::remove_pointer_t<A>>;
    entry[0] = std::is_pointer<A>::value;
    entry[1] = std::is_same<Value, bool>::value        ? 'b'
               : std::is_floating_point<Value>::value ? 'f'
               : std::is_signed<Value>::value         ? 'i'
                                                      : 'u';
    entry[2] = sizeof(Value);
}

// Write three numbers per parameter into out (at most max_args parameters);
// return the number of parameters.
template <typename... Args>
int signature(void (*)(Args...), long long* out, int max_args) {
    if ((int)sizeof...(Args) <= max_args) {
        int i = 0;
        ((describe<Args>(out + 3 * i++)), ...);
    }
    return (int)sizeof...(Args);
}

}  // namespace cuda_cpu

#endif  // MINIFCN_CUDA_CPU_SHIM_H
