// Torch binding of the CUDA kernels: op schemas, input checks, device guard and stream.
//
// Registered as torch.ops.lora_kernels_cuda.*. The ops write into caller-provided outputs
// (`Tensor(a!)`), so the Python launchers allocate and the tests can hand in poisoned buffers.
// Every check runs before anything is launched and names the argument with the expected and the
// actual value. The kernels themselves live in torch-free translation units (launch_* in
// lora_kernels/params.h).
#ifdef LORA_KERNELS_PYTHON_MODULE
#include <Python.h>  // first, as Python asks
#endif

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "lora_kernels/params.h"

namespace lora_kernels {
namespace {

std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "]";
  return out.str();
}

void check_shape(const at::Tensor& t, const char* name, const std::vector<int64_t>& expected) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(expected), "expected ", name, " of shape ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "expected ", name, " to be ", dim, "-D ", layout, ", got shape ",
              shape_str(t.sizes()));
}

void check_device(const at::Tensor& t, const char* name, const c10::Device& device) {
  TORCH_CHECK(t.is_cuda(), "expected ", name, " on a CUDA device, got ", t.device());
  TORCH_CHECK(t.device() == device, "expected ", name, " on ", device, " (the device of x), got ",
              t.device());
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, "expected ", name, " of dtype ", expected, ", got ",
              t.scalar_type());
}

// Rows read with 16-byte vector loads: unit column stride, every other stride a multiple of
// `vec` elements, and a 16-byte aligned start.
void check_vector_rows(const at::Tensor& t, const char* name, int64_t vec) {
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "expected ", name,
              " to have unit stride in its last dimension, got strides ", shape_str(t.strides()));
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) % vec == 0, "expected the strides of ", name, " to be multiples of ",
                vec, " elements (16-byte rows), got strides ", shape_str(t.strides()));
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "expected ", name,
              " to start 16-byte aligned, got data_ptr ", t.data_ptr());
}

void check_unit_last_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "expected ", name,
              " to have unit stride in its last dimension, got strides ", shape_str(t.strides()));
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "expected ", name, " to be contiguous, got strides ",
              shape_str(t.strides()), " for shape ", shape_str(t.sizes()));
}

void check_int32(int64_t v, const char* what) {
  TORCH_CHECK(v <= INT32_MAX, "expected ", what, " < 2^31, got ", v);
}

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

// Checks shared by the single- and the multi-adapter forward; fills the base-layer fields.
LoraLinearParams check_base(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& y,
                            const at::Tensor& s, int64_t r) {
  TORCH_CHECK(x.is_cuda(), "expected x on a CUDA device, got ", x.device());
  const c10::Device device = x.device();
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "expected x of dtype float16 or bfloat16, got ", x.scalar_type());
  check_dim(x, "x", 2, "[M, K]");
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  TORCH_CHECK(m <= kMaxDecodeRows, "expected at most ", kMaxDecodeRows,
              " rows of x (the decode kernels), got ", m);
  TORCH_CHECK(k % kVecElems == 0, "expected K (the last dimension of x) to be a multiple of ",
              kVecElems, ", got ", k);
  check_int32(k, "K");
  check_vector_rows(x, "x", kVecElems);

  check_device(weight, "weight", device);
  check_dtype(weight, "weight", x.scalar_type());
  check_dim(weight, "weight", 2, "[N, K]");
  const int64_t n = weight.size(0);
  check_int32(n, "N");
  check_shape(weight, "weight", {n, k});
  check_vector_rows(weight, "weight", kVecElems);

  if (bias.has_value()) {
    check_device(*bias, "bias", device);
    check_dtype(*bias, "bias", x.scalar_type());
    check_shape(*bias, "bias", {n});
    check_unit_last_stride(*bias, "bias");
  }

  TORCH_CHECK(r >= 1 && r <= kMaxRank, "expected a rank between 1 and ", kMaxRank, ", got ", r);
  check_device(y, "y", device);
  check_dtype(y, "y", x.scalar_type());
  check_shape(y, "y", {m, n});
  check_unit_last_stride(y, "y");
  check_device(s, "s", device);
  check_dtype(s, "s", at::kFloat);
  check_shape(s, "s", {m, r});
  check_contiguous(s, "s");

  LoraLinearParams p{};
  p.x = x.data_ptr();
  p.x_lora = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.s = s.data_ptr<float>();
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.r = static_cast<int>(r);
  p.num_adapters = 1;
  p.ldx = x.stride(0);
  p.ldx_lora = x.stride(0);
  p.ldw = weight.stride(0);
  p.ldy = y.stride(0);
  p.dtype = kernel_dtype(x.scalar_type());
  return p;
}

void check_x_lora(const std::optional<at::Tensor>& x_lora, const at::Tensor& x,
                  LoraLinearParams& p) {
  if (!x_lora.has_value()) return;
  check_device(*x_lora, "x_lora", x.device());
  check_dtype(*x_lora, "x_lora", x.scalar_type());
  check_shape(*x_lora, "x_lora", x.sizes().vec());
  check_vector_rows(*x_lora, "x_lora", kVecElems);
  p.x_lora = x_lora->data_ptr();
  p.ldx_lora = x_lora->stride(0);
}

// y = x @ weight.T + bias + scale * (x_lora @ lora_a.T) @ lora_b.T, s = x_lora @ lora_a.T (fp32).
void lora_linear_out(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                     const at::Tensor& lora_b, double scale,
                     const std::optional<at::Tensor>& x_lora, at::Tensor& y, at::Tensor& s) {
  TORCH_CHECK(lora_a.dim() == 2, "expected lora_a to be 2-D [r, K], got shape ",
              shape_str(lora_a.sizes()));
  const int64_t r = lora_a.size(0);
  LoraLinearParams p = check_base(x, weight, bias, y, s, r);
  check_x_lora(x_lora, x, p);
  check_device(lora_a, "lora_a", x.device());
  check_dtype(lora_a, "lora_a", x.scalar_type());
  check_shape(lora_a, "lora_a", {r, p.k});
  check_vector_rows(lora_a, "lora_a", kVecElems);
  check_device(lora_b, "lora_b", x.device());
  check_dtype(lora_b, "lora_b", x.scalar_type());
  check_shape(lora_b, "lora_b", {p.n, r});
  check_unit_last_stride(lora_b, "lora_b");

  p.lora_a = lora_a.data_ptr();
  p.lora_b = lora_b.data_ptr();
  p.lda = lora_a.stride(0);
  p.ldb = lora_b.stride(0);
  p.scale = static_cast<float>(scale);

  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(launch_lora_linear(p, c10::cuda::getCurrentCUDAStream(x.device().index())));
}

// Row i uses adapter a = row_ids[i]: y[i] = x[i] @ weight.T + bias
// + scales[a] * (x[i] @ lora_a[a, :rank_a].T) @ lora_b[a, :, :rank_a].T; ids outside [0, L): base.
void lora_linear_multi_out(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, const at::Tensor& scales,
                           const at::Tensor& row_ids, const std::optional<at::Tensor>& ranks,
                           at::Tensor& y, at::Tensor& s) {
  TORCH_CHECK(lora_a.dim() == 3, "expected lora_a to be 3-D [L, r, K], got shape ",
              shape_str(lora_a.sizes()));
  const int64_t num_adapters = lora_a.size(0);
  const int64_t r = lora_a.size(1);
  LoraLinearParams p = check_base(x, weight, bias, y, s, r);
  TORCH_CHECK(num_adapters >= 1, "expected at least one adapter in lora_a, got shape ",
              shape_str(lora_a.sizes()));
  check_int32(num_adapters, "the number of adapters");
  check_device(lora_a, "lora_a", x.device());
  check_dtype(lora_a, "lora_a", x.scalar_type());
  check_shape(lora_a, "lora_a", {num_adapters, r, p.k});
  check_vector_rows(lora_a, "lora_a", kVecElems);
  check_device(lora_b, "lora_b", x.device());
  check_dtype(lora_b, "lora_b", x.scalar_type());
  check_shape(lora_b, "lora_b", {num_adapters, p.n, r});
  check_unit_last_stride(lora_b, "lora_b");
  check_device(scales, "scales", x.device());
  check_dtype(scales, "scales", at::kFloat);
  check_shape(scales, "scales", {num_adapters});
  check_contiguous(scales, "scales");
  check_device(row_ids, "row_ids", x.device());
  check_dtype(row_ids, "row_ids", at::kInt);
  check_shape(row_ids, "row_ids", {p.m});
  check_contiguous(row_ids, "row_ids");
  if (ranks.has_value()) {
    check_device(*ranks, "ranks", x.device());
    check_dtype(*ranks, "ranks", at::kInt);
    check_shape(*ranks, "ranks", {num_adapters});
    check_contiguous(*ranks, "ranks");
  }

  p.lora_a = lora_a.data_ptr();
  p.lora_b = lora_b.data_ptr();
  p.scales = scales.data_ptr<float>();
  p.row_ids = row_ids.data_ptr<int32_t>();
  p.ranks = ranks.has_value() ? ranks->data_ptr<int32_t>() : nullptr;
  p.num_adapters = static_cast<int>(num_adapters);
  p.lda = lora_a.stride(1);
  p.ldb = lora_b.stride(1);
  p.a_adapter_stride = lora_a.stride(0);
  p.b_adapter_stride = lora_b.stride(0);

  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(launch_lora_linear_multi(p, c10::cuda::getCurrentCUDAStream(x.device().index())));
}

// weight += scale * lora_b @ lora_a, in place, fp32 accumulation and one rounding.
void merge_(at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale) {
  TORCH_CHECK(weight.is_cuda(), "expected weight on a CUDA device, got ", weight.device());
  const c10::Device device = weight.device();
  const at::ScalarType dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "expected weight of dtype float16, bfloat16 or float32, got ", dtype);
  check_dim(weight, "weight", 2, "[N, K]");
  const int64_t n = weight.size(0);
  const int64_t k = weight.size(1);
  check_int32(n, "N");
  check_int32(k, "K");
  // fp16/bf16 rows move as 8-element vectors; fp32 rows (and lora_a rows) as 4-element ones.
  const int64_t vec = dtype == at::kFloat ? 4 : kVecElems;
  TORCH_CHECK(k % vec == 0, "expected K (the last dimension of weight) to be a multiple of ", vec,
              " for ", dtype, ", got ", k);
  check_vector_rows(weight, "weight", vec);
  TORCH_CHECK(lora_a.dim() == 2, "expected lora_a to be 2-D [r, K], got shape ",
              shape_str(lora_a.sizes()));
  const int64_t r = lora_a.size(0);
  check_int32(r, "r");
  check_device(lora_a, "lora_a", device);
  check_dtype(lora_a, "lora_a", dtype);
  check_shape(lora_a, "lora_a", {r, k});
  if (dtype == at::kFloat) {
    check_vector_rows(lora_a, "lora_a", vec);
  } else {
    check_unit_last_stride(lora_a, "lora_a");
  }
  check_device(lora_b, "lora_b", device);
  check_dtype(lora_b, "lora_b", dtype);
  check_shape(lora_b, "lora_b", {n, r});
  check_unit_last_stride(lora_b, "lora_b");

  MergeParams p{};
  p.weight = weight.data_ptr();
  p.lora_a = lora_a.data_ptr();
  p.lora_b = lora_b.data_ptr();
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.r = static_cast<int>(r);
  p.ldw = weight.stride(0);
  p.lda = lora_a.stride(0);
  p.ldb = lora_b.stride(0);
  p.scale = static_cast<float>(scale);
  p.dtype = kernel_dtype(dtype);

  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(launch_merge(p, c10::cuda::getCurrentCUDAStream(device.index())));
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY(lora_kernels_cuda, m) {
  m.def(
      "lora_linear_out(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, Tensor? x_lora, Tensor(a!) y, Tensor(b!) s) -> ()");
  m.def(
      "lora_linear_multi_out(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, Tensor scales, Tensor row_ids, Tensor? ranks, Tensor(a!) y, "
      "Tensor(b!) s) -> ()");
  m.def("merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("lora_linear_out", &lora_kernels::lora_linear_out);
  m.impl("lora_linear_multi_out", &lora_kernels::lora_linear_multi_out);
  m.impl("merge_", &lora_kernels::merge_);
}

// Registered for CPU too, so that a call with CPU tensors gets the same "expected x on a CUDA
// device" message as a mixed-device call, instead of the dispatcher's missing-kernel error.
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CPU, m) {
  m.impl("lora_linear_out", &lora_kernels::lora_linear_out);
  m.impl("lora_linear_multi_out", &lora_kernels::lora_linear_multi_out);
  m.impl("merge_", &lora_kernels::merge_);
}

#ifdef LORA_KERNELS_PYTHON_MODULE
// The ahead-of-time build is imported as the Python module lora_kernels._C; importing it runs
// the registrations above. The JIT build is loaded as a plain library and needs no module.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of lora_kernels (torch.ops.lora_kernels_cuda)",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
