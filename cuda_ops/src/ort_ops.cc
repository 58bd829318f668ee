// onnxruntime custom-op library: domain "ai.eqc", ops FusedInt8Gemm (W8A8, per-token int8
// activations) and Int8WeightGemm (int8 weights, float activations), both since version 1.
//
// Built twice from this file: libeqc_ops.so (CPU kernel only, no CUDA dependency) and, when nvcc
// is available, libeqc_ops_cuda.so (EQC_WITH_CUDA=1: CPU kernel + a CUDAExecutionProvider kernel).
// Neither links libonnxruntime: ORT passes its API table to RegisterCustomOps.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu_gemm.h"
#if EQC_WITH_CUDA
#include "eqc_ops_cuda.h"
#endif

#define EQC_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* kDomain = "ai.eqc";
constexpr const char* kOpName = "FusedInt8Gemm";
constexpr const char* kWeightOpName = "Int8WeightGemm";

// Optional attribute read with one of OrtApi's KernelInfoGetAttribute_* getters: missing -> default (the C++
// GetAttribute throws instead).
template <typename T, typename Getter>
T optional_attr(const OrtApi& api, Getter get, const OrtKernelInfo* info, const char* name, T dflt) {
  T v = dflt;
  OrtStatus* st = get(info, name, &v);
  if (st) {
    api.ReleaseStatus(st);
    return dflt;
  }
  return v;
}

float float_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name, float dflt) {
  return optional_attr(api, api.KernelInfoGetAttribute_float, info, name, dflt);
}

int64_t int_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t dflt) {
  return optional_attr(api, api.KernelInfoGetAttribute_int64, info, name, dflt);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

// Validated problem description shared by the CPU and CUDA kernels.
struct Problem {
  std::vector<int64_t> y_shape;
  int64_t M = 0, N = 0, K = 0;
  const float* a = nullptr;
  const int8_t* b = nullptr;
  const float* b_scale = nullptr;
  const float* bias = nullptr;
  float* y = nullptr;
};

Ort::Status invalid(const std::string& msg, const char* op = kOpName) {
  return Ort::Status((std::string(op) + ": " + msg).c_str(), ORT_INVALID_ARGUMENT);
}

// Checks shapes, allocates Y. Returns a non-OK status on malformed inputs. Both ops share the
// input contract: A [..., K] float, B [N, K] int8, B_scale [N], optional bias [N].
Ort::Status prepare(Ort::KernelContext& ctx, Problem& p, const char* op = kOpName) {
  auto invalid = [op](const std::string& msg) { return ::invalid(msg, op); };
  Ort::ConstValue a = ctx.GetInput(0), b = ctx.GetInput(1), sb = ctx.GetInput(2);
  Ort::ConstValue bias = ctx.GetInput(3);
  const std::vector<int64_t> as = a.GetTensorTypeAndShapeInfo().GetShape();
  const std::vector<int64_t> bs = b.GetTensorTypeAndShapeInfo().GetShape();
  if (as.empty()) return invalid("A must have rank >= 1, got a scalar");
  if (bs.size() != 2) return invalid("B must be 2-D [N, K], got " + shape_str(bs));
  p.K = as.back();
  p.N = bs[0];
  if (bs[1] != p.K)
    return invalid("B is " + shape_str(bs) + " but A's last dim is K=" + std::to_string(p.K) +
                   " (B must be [N, K], i.e. pre-transposed)");
  if (sb.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(p.N))
    return invalid("B_scale must have N=" + std::to_string(p.N) + " elements, got " +
                   shape_str(sb.GetTensorTypeAndShapeInfo().GetShape()));
  if (bias != nullptr && bias.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(p.N))
    return invalid("bias must have N=" + std::to_string(p.N) + " elements, got " +
                   shape_str(bias.GetTensorTypeAndShapeInfo().GetShape()));
  p.M = 1;
  for (size_t i = 0; i + 1 < as.size(); ++i) p.M *= as[i];
  p.y_shape.assign(as.begin(), as.end() - 1);
  p.y_shape.push_back(p.N);
  Ort::UnownedValue y = ctx.GetOutput(0, p.y_shape);
  p.a = a.GetTensorData<float>();
  p.b = b.GetTensorData<int8_t>();
  p.b_scale = sb.GetTensorData<float>();
  p.bias = bias != nullptr ? bias.GetTensorData<float>() : nullptr;
  p.y = y.GetTensorMutableData<float>();
  return Ort::Status{nullptr};
}

// Runs `body` and turns any exception into an OrtStatus: nothing may unwind into ORT's C ABI.
template <typename F>
OrtStatusPtr guarded(F&& body) {
  try {
    return body().release();
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), e.GetOrtErrorCode()).release();
  } catch (const std::exception& e) {
    return Ort::Status((std::string(kOpName) + ": " + e.what()).c_str(), ORT_FAIL).release();
  }
}

// ---------------------------------------------------------------------------- CPU kernels
// ORT's intra-op pool: honours SessionOptions.intra_op_num_threads.
eqc::cpu::ParallelFor parallel_for(Ort::KernelContext& ctx) {
  return [&ctx](int64_t total, const std::function<void(int64_t)>& fn) {
    ctx.ParallelFor(
        [](void* data, size_t i) { (*static_cast<const std::function<void(int64_t)>*>(data))(int64_t(i)); },
        static_cast<size_t>(total), 0, const_cast<std::function<void(int64_t)>*>(&fn));
  };
}

// B's row sums when B is a constant initializer (the usual case: the quantized weight), computed once here
// rather than on every call; empty otherwise.
std::vector<int32_t> constant_column_sums(const OrtApi& api, const OrtKernelInfo* info) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &value);
  if (st) {
    api.ReleaseStatus(st);
    return {};
  }
  if (!is_constant || value == nullptr) return {};
  Ort::ConstValue b(value);
  const std::vector<int64_t> shape = b.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != 2 || b.GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) return {};
  return eqc::cpu::column_sums(b.GetTensorData<int8_t>(), shape[0], shape[1]);
}

struct CpuKernel {
  CpuKernel(const OrtApi& api, const OrtKernelInfo* info) : colsum_(constant_column_sums(api, info)) {
    qp_.absmax_floor = float_attr(api, info, "absmax_floor", 0.0f);
    qp_.scale_floor = float_attr(api, info, "scale_floor", 0.0f);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return guarded([&]() -> Ort::Status {
      Ort::KernelContext ctx(raw);
      Problem p;
      Ort::Status st = prepare(ctx, p);
      if (!st.IsOK() || p.M == 0 || p.N == 0) return st;
      std::vector<char> ws(eqc::cpu::workspace_bytes(p.M, p.K));
      const bool sums = colsum_.size() == static_cast<size_t>(p.N);  // B was the constant they were taken of
      eqc::cpu::fused_int8_gemm(p.a, p.b, p.b_scale, p.bias, p.y, p.M, p.N, p.K, qp_, ws.data(), parallel_for(ctx),
                                sums ? colsum_.data() : nullptr);
      return Ort::Status{nullptr};
    });
  }

  const std::vector<int32_t> colsum_;
  eqc::cpu::QuantParams qp_;
};

struct CpuWeightKernel {
  // activation_bits: 0 (default) multiplies the float activations; 16 quantizes each row to int16 first
  // (exact integer products: about 3x fewer instructions, so a decode step's lm_head runs at memory speed).
  CpuWeightKernel(const OrtApi& api, const OrtKernelInfo* info)
      : activation_bits_(int_attr(api, info, "activation_bits", 0)) {
    if (activation_bits_ != 0 && activation_bits_ != 16)
      throw Ort::Exception(std::string(kWeightOpName) + ": activation_bits must be 0 (float) or 16, got " +
                               std::to_string(activation_bits_),
                           ORT_INVALID_ARGUMENT);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return guarded([&]() -> Ort::Status {
      Ort::KernelContext ctx(raw);
      Problem p;
      Ort::Status st = prepare(ctx, p, kWeightOpName);
      if (!st.IsOK() || p.M == 0 || p.N == 0) return st;
      eqc::cpu::int8_weight_gemm(p.a, p.b, p.b_scale, p.bias, p.y, p.M, p.N, p.K, parallel_for(ctx),
                                 int(activation_bits_));
      return Ort::Status{nullptr};
    });
  }

  const int64_t activation_bits_;
};

template <typename Op, typename Kernel, const char* const* kName = &kOpName>
struct OpBase : Ort::CustomOpBase<Op, Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&]() -> Ort::Status {
      *kernel = new Kernel(api, info);
      return Ort::Status{nullptr};
    });
  }
  const char* GetName() const { return *kName; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct CpuOp : OpBase<CpuOp, CpuKernel> {};
struct CpuWeightOp : OpBase<CpuWeightOp, CpuWeightKernel, &kWeightOpName> {};

#if EQC_WITH_CUDA
// --------------------------------------------------------------------------- CUDA kernel
struct CudaKernel {
  CudaKernel(const OrtApi& api, const OrtKernelInfo* info) {
    absmax_floor_ = float_attr(api, info, "absmax_floor", 0.0f);
    scale_floor_ = float_attr(api, info, "scale_floor", 0.0f);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    return guarded([&]() -> Ort::Status {
      Ort::KernelContext ctx(raw);
      Problem p;
      Ort::Status st = prepare(ctx, p);
      if (!st.IsOK() || p.M == 0 || p.N == 0) return st;
      if (p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return invalid("dimension exceeds int32");
      int rc = eqc_fused_int8_gemm_cuda_ex(p.a, p.b, p.b_scale, p.bias, p.y, int(p.M), int(p.N), int(p.K),
                                           absmax_floor_, scale_floor_, nullptr, 0, ctx.GetGPUComputeStream());
      if (rc != 0)
        return Ort::Status((std::string(kOpName) + " (CUDA): " + eqc_cuda_error_string(rc)).c_str(), ORT_FAIL);
      return Ort::Status{nullptr};
    });
  }

  float absmax_floor_ = 0.0f, scale_floor_ = 0.0f;
};

struct CudaOp : OpBase<CudaOp, CudaKernel> {
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
};
#endif

// Op objects and domains must outlive every session that uses them: keep them for the process.
const CpuOp kCpuOp;
const CpuWeightOp kCpuWeightOp;
#if EQC_WITH_CUDA
const CudaOp kCudaOp;
#endif
// Domains are leaked on purpose: releasing them from a static destructor at exit could run
// after onnxruntime itself is gone.
std::mutex g_domains_mutex;
std::vector<OrtCustomOpDomain*>* g_domains = new std::vector<OrtCustomOpDomain*>();

}  // namespace

EQC_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;  // cannot even report an error
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Runtime older than our headers. API version 1 is guaranteed and has CreateStatus.
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "eqc_ops needs onnxruntime API version %d (onnxruntime >= 1.%d); this runtime is %s",
                  ORT_API_VERSION, ORT_API_VERSION, api_base->GetVersionString());
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL, msg) : nullptr;
  }
  Ort::InitApi(api);
  return guarded([&]() -> Ort::Status {
    Ort::CustomOpDomain domain{kDomain};
    domain.Add(&kCpuOp);
    domain.Add(&kCpuWeightOp);  // CPU only: the CUDA provider runs the weight-only QDQ graph as is
#if EQC_WITH_CUDA
    domain.Add(&kCudaOp);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    g_domains->push_back(domain.release());
    return Ort::Status{nullptr};
  });
}

EQC_API const char* eqc_ops_build_info() {
  static const std::string info = std::string("eqc_ops ort_api=") + std::to_string(ORT_API_VERSION) +
                                  " cuda=" + (EQC_WITH_CUDA ? "1" : "0") + " cpu_isa=" + eqc::cpu::isa_name();
  return info.c_str();
}
