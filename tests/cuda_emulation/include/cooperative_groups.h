// Shadows the CUDA toolkit header of the same name: see cuda_emulation.h (included before every
// kernel source). Models the thread block and the thread block cluster groups, as CUDA's header
// does, on the block barrier and the __cluster* intrinsics; the rest of cooperative groups fails
// to compile with a message naming what is not modelled.
#pragma once

namespace cooperative_groups {
namespace emulation_detail {
template <class T> constexpr bool not_modelled = false;
}

class thread_block {
    friend thread_block this_thread_block();
    thread_block() = default;

 public:
    struct arrival_token {};

    static void sync(cuda_emu::Site site = cuda_emu::Site::here()) { __syncthreads(site); }
    // As in CUDA: arriving does nothing, the wait is the block barrier.
    arrival_token barrier_arrive() const { return arrival_token(); }
    void barrier_wait(arrival_token&&, cuda_emu::Site site = cuda_emu::Site::here()) const {
        __syncthreads(site);
    }
    static unsigned num_threads() { return blockDim.x * blockDim.y * blockDim.z; }
    static unsigned size() { return num_threads(); }
    static unsigned thread_rank() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
    static dim3 group_index() { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
    static dim3 thread_index() { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
    static dim3 dim_threads() { return dim3(blockDim.x, blockDim.y, blockDim.z); }
    static dim3 group_dim() { return dim_threads(); }
};

inline thread_block this_thread_block() { return thread_block(); }

class cluster_group {
    friend cluster_group this_cluster();
    cluster_group() = default;

 public:
    // cluster.sync() is one barrier over every thread of every block of the cluster.
    static void sync(cuda_emu::Site site = cuda_emu::Site::here()) { cuda_emu::cluster_barrier(site); }
    static void barrier_arrive() CUDA_EMU_NOT_MODELLED("cluster_group::barrier_arrive() (use cluster.sync())");
    static void barrier_wait() CUDA_EMU_NOT_MODELLED("cluster_group::barrier_wait() (use cluster.sync())");

    // The same location in the shared memory of the block of rank `rank`: `addr` must point into
    // this block's shared memory and `rank` be below num_blocks().
    template <typename T>
    static T* map_shared_rank(T* addr, int rank, cuda_emu::Site site = cuda_emu::Site::here()) {
        return static_cast<T*>(cuda_emu::map_shared_rank(addr, rank, site));
    }
    static unsigned query_shared_rank(const void* addr, cuda_emu::Site site = cuda_emu::Site::here()) {
        return __cluster_query_shared_rank(addr, site);
    }
    static dim3 block_index() { return __clusterRelativeBlockIdx(); }
    static unsigned block_rank() { return __clusterRelativeBlockRank(); }
    static dim3 dim_blocks() { return __clusterDim(); }
    static unsigned num_blocks() { return __clusterSizeInBlocks(); }
    static unsigned thread_rank() { return block_rank() * thread_block::num_threads() + thread_block::thread_rank(); }
    static dim3 thread_index() {
        const dim3 b = block_index();
        return dim3(b.x * blockDim.x + threadIdx.x, b.y * blockDim.y + threadIdx.y, b.z * blockDim.z + threadIdx.z);
    }
    static dim3 dim_threads() {
        const dim3 c = dim_blocks();
        return dim3(c.x * blockDim.x, c.y * blockDim.y, c.z * blockDim.z);
    }
    static unsigned num_threads() { return num_blocks() * thread_block::num_threads(); }
    static unsigned size() { return num_threads(); }
};

inline cluster_group this_cluster() { return cluster_group(); }

// The free functions of CUDA's header, for the groups above.
template <class Group> void sync(const Group& group, cuda_emu::Site site = cuda_emu::Site::here()) {
    group.sync(site);
}
template <class Group> unsigned long long group_size(const Group& group) { return group.size(); }
template <class Group> unsigned long long thread_rank(const Group& group) { return group.thread_rank(); }

// Not modelled: using any of these is a compile error that says so.
class grid_group {
 public:
    void sync() const CUDA_EMU_NOT_MODELLED("grid-wide synchronisation (cooperative_groups::grid_group)");
};
grid_group this_grid() CUDA_EMU_NOT_MODELLED("cooperative_groups::this_grid() (grid-wide synchronisation)");
class multi_grid_group {};
multi_grid_group this_multi_grid() CUDA_EMU_NOT_MODELLED("cooperative_groups::this_multi_grid()");
class coalesced_group {};
coalesced_group coalesced_threads() CUDA_EMU_NOT_MODELLED("cooperative_groups::coalesced_threads()");
template <unsigned Size, class Parent = void> class thread_block_tile {
    static_assert(emulation_detail::not_modelled<Parent>,
                  "cuda_emulation: cooperative_groups::thread_block_tile is not modelled");
};
template <unsigned Size, class Parent> void tiled_partition(const Parent&) {
    static_assert(emulation_detail::not_modelled<Parent>,
                  "cuda_emulation: cooperative_groups::tiled_partition is not modelled");
}
template <class Parent> void tiled_partition(const Parent&, unsigned) {
    static_assert(emulation_detail::not_modelled<Parent>,
                  "cuda_emulation: cooperative_groups::tiled_partition is not modelled");
}
}  // namespace cooperative_groups
