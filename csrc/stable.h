// What every operator file of the native libraries includes: PyTorch's stable ABI (the C shim and
// its header-only C++ wrappers, nothing else of torch), and the refusals of the operators.
//
// The libraries are built with TORCH_TARGET_VERSION 2.10 (setup.py): they call only the shim
// functions torch 2.10 has, so one build loads under every torch from 2.10 on.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fusedclip {

using Tensor = torch::stable::Tensor;
using TensorList = std::vector<Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using DeviceType = torch::headeronly::DeviceType;

// A refusal of an operator: raised before anything is written. Every error of a stable kernel
// reaches Python as a RuntimeError; the marker at the start of the message names the exception
// the Python layer raises instead (fusedclip/operators.py: raise_refusal), with the rest of the
// message. Only a refusal carries the marker: an error after a write stays a RuntimeError.
enum class Refusal { kType, kValue };

constexpr const char* kTypeErrorMarker = "[fusedclip TypeError] ";
constexpr const char* kValueErrorMarker = "[fusedclip ValueError] ";

template <typename... Args>
[[noreturn]] void refuse(Refusal kind, const Args&... parts) {
  std::ostringstream message;
  message << (kind == Refusal::kType ? kTypeErrorMarker : kValueErrorMarker) << "fusedclip.";
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

// An error that is not a refusal (an unexpected state): a plain RuntimeError.
template <typename... Args>
[[noreturn]] void fail(const Args&... parts) {
  std::ostringstream message;
  message << "fusedclip: ";
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

// cond, else a TypeError (a tensor or argument of a kind the operator does not take) or a
// ValueError (a value or layout it cannot work with), naming the operator and the argument.
#define FUSEDCLIP_CHECK_TYPE(cond, ...) \
  if (!(cond)) ::fusedclip::refuse(::fusedclip::Refusal::kType, __VA_ARGS__)
#define FUSEDCLIP_CHECK_VALUE(cond, ...) \
  if (!(cond)) ::fusedclip::refuse(::fusedclip::Refusal::kValue, __VA_ARGS__)

// The dtypes in messages, as Python spells them.
inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::ComplexFloat: return "torch.complex64";
    case ScalarType::ComplexDouble: return "torch.complex128";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Int: return "torch.int32";
    case ScalarType::Bool: return "torch.bool";
    default: return "a dtype other than a float or complex one";
  }
}

inline bool is_complex(ScalarType t) { return t == ScalarType::ComplexFloat || t == ScalarType::ComplexDouble; }
inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

inline std::string device_name(const Tensor& t) {
  const auto device = t.device();
  std::string name = device.type() == DeviceType::CUDA ? "cuda" : device.type() == DeviceType::CPU ? "cpu" : "meta";
  if (device.type() == DeviceType::CUDA) name += ":" + std::to_string(device.index());
  return name;
}

// A tensor's sizes as torch prints them: [2, 3].
inline std::string shape_name(const Tensor& t) {
  std::ostringstream out;
  out << "[";
  for (int64_t d = 0; d < t.dim(); ++d) out << (d > 0 ? ", " : "") << t.size(d);
  out << "]";
  return out.str();
}

// aten::<op>.<overload>(t) through the dispatcher, for the one-tensor ATen ops that the stable
// ops.h does not wrap (abs, view_as_real).
inline Tensor aten_unary(const char* op, const char* overload, const Tensor& t) {
  StableIValue stack[1] = {torch::stable::detail::from(t)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack, TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// A 0-dim CPU tensor of dtype holding value.
inline Tensor cpu_scalar(double value, ScalarType dtype) {
  Tensor t = torch::stable::empty({}, dtype);
  if (dtype == ScalarType::Double) {
    *static_cast<double*>(t.mutable_data_ptr()) = value;
  } else {
    *static_cast<float*>(t.mutable_data_ptr()) = static_cast<float>(value);
  }
  return t;
}

// The value of a one-element floating-point CPU tensor (a coefficient, an inverse loss scale).
inline double cpu_value(const Tensor& t) {
  if (t.scalar_type() == ScalarType::Double) return *static_cast<const double*>(t.const_data_ptr());
  if (t.scalar_type() == ScalarType::Float) return *static_cast<const float*>(t.const_data_ptr());
  const Tensor wide = torch::stable::to(t, ScalarType::Double);  // float16, bfloat16: exact in float64
  return *static_cast<const double*>(wide.const_data_ptr());
}

}  // namespace fusedclip
