// CUDA kernel of splice::gather_rows / splice::scatter_rows, free of torch headers: block (i, c) copies
// chunk c of one row, with the widest vector loads that the row size and the base addresses allow.
// The contract is python/splice/ops/row_select_reference.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace splice {
namespace gpu {

// Gather: row i of dst is row idx[i] of src. Scatter: row idx[i] of dst is row i of src.
// src and dst are contiguous [*, row_bytes] byte arrays; idx values must lie in [0, indexed_rows),
// where the indexed tensor is src for a gather and dst for a scatter.
struct RowCopyArgs {
  const char* src;
  char* dst;
  const int64_t* idx;   // [count]
  int64_t count;        // rows copied
  int64_t indexed_rows;
  int64_t row_bytes;
  bool gather;
};

// V is the copy unit (uint4, uint2, uint32_t or uint16_t); row_bytes and both base addresses are
// multiples of sizeof(V). An out-of-range index fails a device-side assert, kept under NDEBUG like
// torch's CUDA_KERNEL_ASSERT: its row is not copied and the next synchronising CUDA call raises.
template <typename V, bool kGather>
__global__ void copy_rows_kernel(const RowCopyArgs a) {
  const int64_t i = blockIdx.x, r = a.idx[i];
  if (r < 0 || r >= a.indexed_rows) {
    __assert_fail("row_select: idx value out of range", __FILE__, __LINE__, __func__);
    return;
  }
  const int64_t n = a.row_bytes / static_cast<int64_t>(sizeof(V));
  const V* s = reinterpret_cast<const V*>(a.src + (kGather ? r : i) * a.row_bytes);
  V* d = reinterpret_cast<V*>(a.dst + (kGather ? i : r) * a.row_bytes);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; k < n; k += step) d[k] = s[k];
}

template <typename V>
cudaError_t launch_copy_rows_as(const RowCopyArgs& a, cudaStream_t stream) {
  constexpr int64_t kThreads = 256, kMaxChunks = 65535;
  const int64_t n = a.row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t threads = n < kThreads ? (n + 31) / 32 * 32 : kThreads;
  const int64_t chunks = (n + threads - 1) / threads;
  const dim3 grid(static_cast<unsigned>(a.count),
                  static_cast<unsigned>(chunks < kMaxChunks ? chunks : kMaxChunks));
  if (a.gather) copy_rows_kernel<V, true><<<grid, static_cast<unsigned>(threads), 0, stream>>>(a);
  else copy_rows_kernel<V, false><<<grid, static_cast<unsigned>(threads), 0, stream>>>(a);
  return cudaGetLastError();
}

// Launches the copy on stream with the widest unit that divides row_bytes and both base addresses
// (elements are 2 or 4 bytes, so 2 always does); returns the launch error.
inline cudaError_t launch_copy_rows(const RowCopyArgs& a, cudaStream_t stream) {
  if (a.count == 0 || a.row_bytes == 0) return cudaSuccess;
  const uint64_t align = static_cast<uint64_t>(a.row_bytes) | reinterpret_cast<uintptr_t>(a.src) |
                         reinterpret_cast<uintptr_t>(a.dst);
  if (align % 16 == 0) return launch_copy_rows_as<uint4>(a, stream);
  if (align % 8 == 0) return launch_copy_rows_as<uint2>(a, stream);
  if (align % 4 == 0) return launch_copy_rows_as<uint32_t>(a, stream);
  return launch_copy_rows_as<uint16_t>(a, stream);
}

}  // namespace gpu
}  // namespace splice
