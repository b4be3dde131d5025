// CUDA kernel for upfirdn2d: one thread per output sample; only the taps that land on
// non-inserted (real) input samples are visited, so nothing is upsampled in memory.
//
// Per axis, with U the zero-inserted signal (U[n] = x[n / up] if n % up == 0) and P = pad(U, p0, p1):
//   out[o] = sum_j kflip[j] * P[o * down + j] = sum_j k[K - 1 - j] * U[o * down + j - p0].
#include <ATen/core/Tensor.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace {

struct Params {
  int64_t planes;  // B * C
  int64_t in_h, in_w, out_h, out_w;
  int kh, kw;
  int up_x, up_y, down_x, down_y;
  int pad_x0, pad_y0;
};

// Smallest j >= 0 with (base + j) divisible by up.
__device__ __forceinline__ int first_tap(int64_t base, int up) {
  int64_t r = base % up;
  if (r < 0) r += up;
  return r == 0 ? 0 : static_cast<int>(up - r);
}

template <typename scalar_t>
__global__ void upfirdn2d_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ kernel, const Params p) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t total = p.planes * p.out_h * p.out_w;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ox = idx % p.out_w;
    const int64_t oy = (idx / p.out_w) % p.out_h;
    const int64_t plane = idx / (p.out_w * p.out_h);
    const scalar_t* src = x + plane * p.in_h * p.in_w;
    const int64_t base_y = oy * p.down_y - p.pad_y0;  // U index of tap j = base_y + j
    const int64_t base_x = ox * p.down_x - p.pad_x0;
    acc_t acc = acc_t(0);
    for (int jy = first_tap(base_y, p.up_y); jy < p.kh; jy += p.up_y) {
      const int64_t iy = (base_y + jy) / p.up_y;
      if (iy < 0 || iy >= p.in_h) continue;
      const scalar_t* krow = kernel + static_cast<int64_t>(p.kh - 1 - jy) * p.kw;
      const scalar_t* srow = src + iy * p.in_w;
      for (int jx = first_tap(base_x, p.up_x); jx < p.kw; jx += p.up_x) {
        const int64_t ix = (base_x + jx) / p.up_x;
        if (ix < 0 || ix >= p.in_w) continue;
        acc += static_cast<acc_t>(krow[p.kw - 1 - jx]) * static_cast<acc_t>(srow[ix]);
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

int64_t out_size(int64_t n, int64_t k, int64_t up, int64_t down, int64_t p0, int64_t p1) {
  // Floor division that is correct for negative numerators as well.
  const int64_t num = n * up + p0 + p1 - k + down;
  return num >= 0 ? num / down : -((-num + down - 1) / down);
}

}  // namespace

at::Tensor upfirdn2d_cuda(const at::Tensor& x, const at::Tensor& kernel, int64_t up_x, int64_t up_y,
                             int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                             int64_t pad_y1) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  Params p;
  p.planes = x.size(0) * x.size(1);
  p.in_h = x.size(2);
  p.in_w = x.size(3);
  p.kh = static_cast<int>(kernel.size(0));
  p.kw = static_cast<int>(kernel.size(1));
  p.up_x = static_cast<int>(up_x);
  p.up_y = static_cast<int>(up_y);
  p.down_x = static_cast<int>(down_x);
  p.down_y = static_cast<int>(down_y);
  p.pad_x0 = static_cast<int>(pad_x0);
  p.pad_y0 = static_cast<int>(pad_y0);
  p.out_h = out_size(p.in_h, p.kh, up_y, down_y, pad_y0, pad_y1);
  p.out_w = out_size(p.in_w, p.kw, up_x, down_x, pad_x0, pad_x1);
  TORCH_CHECK(p.out_h >= 1 && p.out_w >= 1, "upfirdn2d: empty output");
  auto out = at::empty({x.size(0), x.size(1), p.out_h, p.out_w}, x.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int threads = 256;
  const int64_t wanted = (total + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(x.scalar_type(), "upfirdn2d_cuda", [&] {
    upfirdn2d_kernel<scalar_t><<<blocks, threads, 0, stream>>>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                               kernel.data_ptr<scalar_t>(), p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
