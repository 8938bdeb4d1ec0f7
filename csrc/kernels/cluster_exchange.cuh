// Distributed-shared-memory exchange inside a thread-block cluster (sm_90): mbarrier set-up, the
// cluster barrier, and 16-byte pushes into another CTA's shared memory that count their bytes on
// its mbarrier. The tensor-core kernel's split-K handoff is built from these.
#pragma once

#include <cstdint>

namespace moegate {
namespace sm90 {

// The partial sums' handoff through distributed shared memory.
//  * Each CTA owns one mbarrier. Thread 0 initialises it (arrival count 1: the owner's own
//    expect-bytes arrival) and publishes the init to the cluster with fence.mbarrier_init, a
//    release fence for mbarrier inits only; every thread then arrives on the cluster barrier,
//    relaxed (the fence already orders the init before thread 0's arrival). Before its first push
//    a CTA waits on that barrier with acquire semantics, so every target mbarrier is initialised
//    and every target CTA is running. By then the wait is long satisfied: it sits after the loads.
//    The arrive is relaxed: with release semantics ptxas compiles it to MEMBAR.ALL.GPU, which every
//    warp would execute before its first weight load (benchmarks/results/README.md, "the
//    tensor-core kernel's cluster arrive, relaxed"); tests/test_kernel_sass.py keeps barriers
//    out of that spot.
//  * A push is st.async: a remote store (4 to 16 bytes: one accumulator fragment, a LoRA CTA's
//    shrink items) that also counts its bytes on the owner's mbarrier. The owner announces the
//    bytes it expects and waits for phase 0 to complete, which makes all of them visible to it.
//    Senders never wait for the rest of the cluster, and no CTA reads another's shared memory, so
//    a CTA may exit once its own inbox is complete.
__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void mbarrier_init_for_cluster(uint32_t bar) {
  asm volatile(
      "mbarrier.init.shared::cta.b64 [%0], 1;\n"
      "fence.mbarrier_init.release.cluster;\n" ::"r"(bar)
      : "memory");
}

__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}

__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// This CTA's rank in its cluster, and the cluster's size in CTAs.
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return rank;
}
__device__ __forceinline__ uint32_t cluster_size() {
  uint32_t size;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
  return size;
}

// The address of this CTA's shared variable `addr` in the CTA of cluster rank `rank`.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  return remote;
}

// Pushes N floats (1, 2 or 4; 4N-byte aligned) in one message: an accumulator fragment, or a
// LoRA CTA's shrink items.
template <int N>
__device__ __forceinline__ void push_to_rank(uint32_t remote_addr, const float (&v)[N],
                                             uint32_t remote_bar) {
  static_assert(N == 1 || N == 2 || N == 4, "st.async stores 4, 8 or 16 bytes");
  if constexpr (N == 1) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
                 ::"r"(remote_addr), "r"(__float_as_uint(v[0])), "r"(remote_bar)
                 : "memory");
  } else if constexpr (N == 2) {
    asm volatile(
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];"
        ::"r"(remote_addr), "r"(__float_as_uint(v[0])), "r"(__float_as_uint(v[1])),
        "r"(remote_bar)
        : "memory");
  } else {
    asm volatile(
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
        ::"r"(remote_addr), "r"(__float_as_uint(v[0])), "r"(__float_as_uint(v[1])),
        "r"(__float_as_uint(v[2])), "r"(__float_as_uint(v[3])), "r"(remote_bar)
        : "memory");
  }
}

__device__ __forceinline__ void mbarrier_expect_bytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Waits until phase 0 of the mbarrier completes; acquire at cluster scope, so that every st.async
// counted on it is visible to the calling thread.
__device__ __forceinline__ void mbarrier_wait_phase0(uint32_t bar) {
  asm volatile(
      "{\n .reg .pred done;\n"
      "wait_%=:\n"
      " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], 0;\n"
      " @!done bra wait_%=;\n}\n" ::"r"(bar)
      : "memory");
}

}  // namespace sm90
}  // namespace moegate
