// Programmatic dependent launch (sm_90 and later; no-ops before): the host launches
// the decode-step kernels with the programmatic-stream-serialization attribute, so a
// kernel's blocks may be scheduled while the previous kernel of the stream is still
// finishing. Every such kernel calls pdl_wait() before touching global memory (it
// returns once the previous kernel has completed and its writes are visible), and
// pdl_trigger() to let the next kernel be scheduled early in turn.
// Passed to NVRTC as an in-memory header by src/cuda/nvrtc.rs and tools/nvrtc-check.
#pragma once

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
