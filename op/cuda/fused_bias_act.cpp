// Python binding for the fused bias + leaky ReLU + scale CUDA kernel (op/fused_act.py).
#include <torch/extension.h>

at::Tensor fused_bias_act_cuda(const torch::Tensor& x, const torch::Tensor& bias, const torch::Tensor& ref,
                                  int64_t mode, double slope, double scale);

// mode 0: y = scale * leaky_relu(x + bias[c], slope), c = index along dim 1 (bias may be empty).
// mode 1: y = x * scale * (ref > 0 ? 1 : slope)  -- the gradient w.r.t. the pre-activation,
//         where ref is the forward output (same sign as the pre-activation for scale > 0, slope >= 0).
torch::Tensor fused_bias_act(const torch::Tensor& x, const torch::Tensor& bias, const torch::Tensor& ref,
                             int64_t mode, double slope, double scale) {
  TORCH_CHECK(x.is_cuda(), "fused_bias_act: input must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 2, "fused_bias_act: input must have rank >= 2");
  TORCH_CHECK(x.is_contiguous(), "fused_bias_act: input must be contiguous");
  TORCH_CHECK(mode == 0 || mode == 1, "fused_bias_act: mode must be 0 or 1");
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.device() == x.device() && bias.scalar_type() == x.scalar_type() && bias.is_contiguous(),
                "fused_bias_act: bias must be a contiguous tensor of the input's device and dtype");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(1), "fused_bias_act: bias must have shape (C,)");
  }
  if (mode == 1) {
    TORCH_CHECK(ref.device() == x.device() && ref.scalar_type() == x.scalar_type() && ref.is_contiguous(),
                "fused_bias_act: ref must be a contiguous tensor of the input's device and dtype");
    TORCH_CHECK(ref.sizes() == x.sizes(), "fused_bias_act: ref must have the input's shape");
  }
  return fused_bias_act_cuda(x, bias, ref, mode, slope, scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_bias_act", &fused_bias_act, "fused bias + leaky ReLU + scale (CUDA)",
        py::arg("x"), py::arg("bias"), py::arg("ref"), py::arg("mode"), py::arg("slope"), py::arg("scale"));
}
