// Shadows the CUDA toolkit header of the same name: the asynchronous copy primitives, modelled by
// the runtime (see "Asynchronous copies" in cuda_emulation.h).
#pragma once

inline void __pipeline_memcpy_async(void* __restrict__ dst_shared, const void* __restrict__ src_global,
                                    size_t size_and_align, size_t zfill = 0,
                                    cuda_emu::Site site = cuda_emu::Site::here()) {
    cuda_emu::async_copy(dst_shared, src_global, size_and_align, zfill, site);
}
inline void __pipeline_commit() { cuda_emu::async_commit(); }
inline void __pipeline_wait_prior(size_t prior) { cuda_emu::async_wait_prior(prior); }
