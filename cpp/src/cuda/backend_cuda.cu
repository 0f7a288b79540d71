// The CUDA backend table: memory and copies here, the other ops in their own files (ops.hpp),
// device discovery, version strings and the DeviceError translation of CUDA/cuBLAS failures.
#include <nccl.h>

#include <mutex>
#include <string>

#include "cuda/common.cuh"
#include "cuda/ops.hpp"
#include "pyswitch/cuda/backend_cuda.hpp"

namespace pyswitch::cuda {
namespace detail {

void throw_cuda_error(const char* op, cudaError_t error) {
  cudaGetLastError();  // clear a sticky launch error so the next op starts clean
  throw DeviceError(pyswitch::detail::concat(op, ": CUDA error ", cudaGetErrorName(error), " (",
                                             cudaGetErrorString(error), ")"));
}

void throw_cublas_error(const char* op, cublasStatus_t status) {
  throw DeviceError(pyswitch::detail::concat(op, ": cuBLAS error ", cublasGetStatusName(status),
                                             " (", cublasGetStatusString(status), ")"));
}

cublasHandle_t cublas_handle() {
  // One per thread and device: cuBLAS handles are not safe to share between host threads.
  struct Handles {
    cublasHandle_t by_device[64] = {};
    ~Handles() {
      for (cublasHandle_t h : by_device) {
        if (h) cublasDestroy(h);
      }
    }
  };
  thread_local Handles handles;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cublas");
  PYSWITCH_CHECK_STATE(device >= 0 && device < 64, "cublas: device index ", device,
                       " is beyond the 64 this backend supports");
  cublasHandle_t& h = handles.by_device[device];
  if (!h) {
    check_cublas(cublasCreate(&h), "cublasCreate");
    check_cublas(cublasSetStream(h, stream()), "cublasSetStream");
    // Deterministic results: no split-K reductions with atomics.
    check_cublas(cublasSetAtomicsMode(h, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
  }
  return h;
}

}  // namespace detail

namespace {

using detail::check_cuda;

void* cuda_allocate(int64_t bytes) {
  PYSWITCH_CHECK_ARG(bytes >= 0, "allocate: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return nullptr;
  void* data = nullptr;
  const cudaError_t error = cudaMalloc(&data, static_cast<size_t>(bytes));
  if (error == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    throw Error(pyswitch::detail::concat("allocate: out of memory for ", bytes,
                                         " bytes on the cuda device"));
  }
  check_cuda(error, "allocate");
  // The table's contract: zero-filled, like the CPU's.
  check_cuda(cudaMemsetAsync(data, 0, static_cast<size_t>(bytes), detail::stream()), "allocate");
  return data;
}

void cuda_release(void* data) {
  if (data) cudaFree(data);  // cudaFree synchronises: no kernel still reads the buffer
}

void cuda_copy(const TensorView& src, const TensorView& dst) {
  detail::require_same_dtype("copy", "src", src, "dst", dst);
  PYSWITCH_CHECK_ARG(src.numel() == dst.numel(), "copy: src has ", src.numel(), " elements, dst ",
                     dst.numel());
  PYSWITCH_CHECK_ARG(src.is_contiguous() && dst.is_contiguous(),
                     "copy: src and dst must be C-contiguous");
  if (src.numel() == 0) return;
  const bool from_host = src.device == Device::cpu, to_host = dst.device == Device::cpu;
  const cudaMemcpyKind kind = from_host
                                  ? (to_host ? cudaMemcpyHostToHost : cudaMemcpyHostToDevice)
                                  : (to_host ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice);
  // Host <-> device copies are synchronous, so a host buffer may be reused (or freed) at once.
  if (kind == cudaMemcpyDeviceToDevice) {
    check_cuda(cudaMemcpyAsync(dst.data, src.data, static_cast<size_t>(src.nbytes()), kind,
                               detail::stream()),
               "copy");
  } else {
    check_cuda(cudaMemcpy(dst.data, src.data, static_cast<size_t>(src.nbytes()), kind), "copy");
  }
}

BackendOps make_cuda_table() {
  BackendOps t;
  t.name = "cuda";
  t.device = Device::cuda;
  t.allocate = cuda_allocate;
  t.release = cuda_release;
  t.copy = cuda_copy;
  t.convert = ops::convert;
  t.add = ops::add;
  t.multiply = ops::multiply;
  t.route = ops::route;
  t.route_backward = ops::route_backward;
  t.softmax_rows = ops::softmax_rows;
  t.dispatch = ops::dispatch;
  t.combine = ops::combine;
  t.combine_backward = ops::combine_backward;
  t.dispatch_backward = ops::dispatch_backward;
  t.experts_forward = ops::experts_forward;
  t.experts_backward = ops::experts_backward;
  t.gemm = ops::gemm;
  t.rmsnorm_forward = ops::rmsnorm_forward;
  t.rmsnorm_backward = ops::rmsnorm_backward;
  t.rope_apply = ops::rope_apply;
  t.attention_forward = ops::attention_forward;
  t.attention_backward = ops::attention_backward;
  t.embedding_forward = ops::embedding_forward;
  t.embedding_backward = ops::embedding_backward;
  t.cross_entropy = ops::cross_entropy;
  t.adamw_update = ops::adamw_update;
  t.adafactor_update = ops::adafactor_update;
  t.sum_of_squares = ops::sum_of_squares;
  t.scale = ops::scale;
  return t;
}

std::string version_text(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace

int device_count() {
  // Without a driver cudaGetDeviceCount fails (cudaErrorInsufficientDriver or NoDevice) and
  // leaves the count untouched, hence the 0 first.
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

DeviceInfo device_info(int device) {
  const int count = device_count();
  if (count == 0) throw DeviceError("device_info: no CUDA device is visible");
  PYSWITCH_CHECK_ARG(device >= 0 && device < count, "device_info: device must be in [0, ", count,
                     "), got ", device);
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, device), "device_info");
  DeviceInfo info;
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
  return info;
}

std::string versions() {
  int runtime = 0, driver = 0, nccl = 0;
  cudaRuntimeGetVersion(&runtime);
  const bool has_driver = cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0;
  cudaGetLastError();
  ncclGetVersion(&nccl);
  return "CUDA runtime " + version_text(runtime) + ", driver " +
         (has_driver ? version_text(driver) : std::string("none")) + ", cuBLAS " +
         std::to_string(CUBLAS_VERSION) + ", NCCL " + std::to_string(nccl / 10000) + "." +
         std::to_string((nccl / 100) % 100) + "." + std::to_string(nccl % 100);
}

const BackendOps& backend() {
  if (device_count() == 0) {
    throw DeviceError(
        "cuda: no CUDA device is visible (no driver, no GPU, or CUDA_VISIBLE_DEVICES hides "
        "them); use device='cpu'");
  }
  static const BackendOps table = make_cuda_table();
  return table;
}

const BackendOps* register_backend() {
  return pyswitch::register_backend(backend());
}

}  // namespace pyswitch::cuda
