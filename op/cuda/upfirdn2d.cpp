// Python binding for the upfirdn2d CUDA kernel (op/upfirdn.py).
#include <torch/extension.h>

at::Tensor upfirdn2d_cuda(const torch::Tensor& x, const torch::Tensor& kernel, int64_t up_x, int64_t up_y,
                             int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                             int64_t pad_y1);

// x: (B, C, H, W) contiguous CUDA tensor; kernel: (kh, kw) of the same dtype/device.
// Zero-insertion upsampling, pad/crop, true convolution with `kernel`, decimation (SPEC 4.2).
torch::Tensor upfirdn2d(const torch::Tensor& x, const torch::Tensor& kernel, int64_t up_x, int64_t up_y,
                        int64_t down_x, int64_t down_y, int64_t pad_x0, int64_t pad_x1, int64_t pad_y0,
                        int64_t pad_y1) {
  TORCH_CHECK(x.is_cuda(), "upfirdn2d: input must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "upfirdn2d: input must be a contiguous (B, C, H, W) tensor");
  TORCH_CHECK(kernel.dim() == 2 && kernel.is_contiguous(), "upfirdn2d: kernel must be a contiguous 2-D tensor");
  TORCH_CHECK(kernel.device() == x.device() && kernel.scalar_type() == x.scalar_type(),
              "upfirdn2d: kernel must have the input's device and dtype");
  TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "upfirdn2d: factors must be >= 1");
  return upfirdn2d_cuda(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upfirdn2d", &upfirdn2d, "upfirdn2d (CUDA)", py::arg("x"), py::arg("kernel"), py::arg("up_x"),
        py::arg("up_y"), py::arg("down_x"), py::arg("down_y"), py::arg("pad_x0"), py::arg("pad_x1"),
        py::arg("pad_y0"), py::arg("pad_y1"));
}
