// runtime.cpp -- the part of the CUDA emulator that is not inline in cuda_emulation.h.
//
// Reading guide (top to bottom):
//   1. Kernel registry     filled by static initialisers in the generated kernel translation units
//   2. Fibers              stacks with guard pages, the x86-64 stack switch, AddressSanitizer notes
//   3. Launch, Team,       a launch hands clusters of blocks to teams of worker OS threads: a team
//      Worker              has one worker per block of a cluster (one for kernels without
//                          __cluster_dims__), and each worker runs one block at a time
//   4. Running a block     the team's turns, the scheduler loop and the order in which ready
//                          fibers are resumed
//   5. Barriers, warp ops  called from kernel code on a fiber's stack; 5b. cluster.sync() and
//                          distributed shared memory (map_shared_rank)
//   6. Deadlocks           what to say when nothing is ready but some threads have not finished
//   7. Faults              errors, signals (SIGSEGV, ...), assert(), timeouts
//   8. Shared memory       every __shared__ variable lives in this module's thread-local block,
//                          which is filled with 0xFF before each block; dynamic overrun checks
//   9. C interface         the cuda_emu_* functions Python calls through ctypes
//
// Clusters in one paragraph: every block of a cluster needs its own shared memory, and shared
// memory is thread-local (section 8), so each block of a cluster runs on its own worker OS thread
// of the cluster's team. The workers of a team take turns, one at a time, handing the turn over
// under the team's mutex: a block runs until every one of its threads waits at cluster.sync() or
// has exited, then the next block in the launch's order gets the turn; when all wait, the barrier
// opens. One block at a time keeps a cluster's schedule deterministic (races between blocks show
// in the same order every time) and lets the workers read each other's shared memory without
// data races. map_shared_rank() adds the offset of an address in its own thread-local block to
// the other worker's block. A block's shared memory is filled with 0xFF when it starts (its first
// turn) and when it exits, so distributed shared memory accesses that cluster.sync() does not
// order read garbage. The next cluster starts only when every block of the team's cluster exited.
//
// Invariant used by section 8: the runtime's only thread-local variable is
// cuda_emu::current_thread (set while a fiber runs, null in scheduler code).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdarg>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <dlfcn.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include "cuda_emulation.h"

#if !defined(__x86_64__) || !defined(__linux__)
#error "cuda_emulation runtime: only Linux x86-64 is supported (stack switch and TLS handling)"
#endif

#define CUDA_EMU_EXPORT extern "C" __attribute__((visibility("default")))

// Dynamic shared memory: defined in a file generated per module (see _build.py), section 8.
extern "C" __thread unsigned char cuda_emu_dynamic_shared[];
extern "C" const std::size_t cuda_emu_dynamic_shared_capacity;  // incl. guard bytes

namespace cuda_emu {

__thread ThreadView* current_thread = nullptr;

// =============================================================================================
// 1. Kernel registry
// =============================================================================================
struct Kernel {
    std::string name, signature, access, param_names;
    void (*function)();
    Invoker invoke;
    int max_threads;  // from __launch_bounds__, 0 when unknown
    unsigned cluster[3];  // from __cluster_dims__, all 0 without
};

static std::vector<Kernel>& kernels() {
    static std::vector<Kernel> all;
    return all;
}

int register_kernel_erased(const char* name, void (*function)(), Invoker invoke,
                           const char* signature, const char* access, const char* param_names,
                           int max_threads, ClusterShape cluster) {
    for (const Kernel& k : kernels())
        if (k.name == name) return 0;  // the same kernel seen from two sources
    kernels().push_back(Kernel{name, signature, access, param_names, function, invoke, max_threads,
                               {cluster.x, cluster.y, cluster.z}});
    return 1;
}

// =============================================================================================
// 2. Fibers
// =============================================================================================
constexpr std::size_t kStackSize = 256 * 1024;

struct Stack {
    char* lo = nullptr;  // usable stack is [lo, lo + kStackSize); one PROT_NONE guard page below lo
};

static std::size_t page_size() { return std::size_t(sysconf(_SC_PAGESIZE)); }

static Stack allocate_stack() {
    void* memory = mmap(nullptr, kStackSize + page_size(), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (memory == MAP_FAILED) throw std::bad_alloc();
    mprotect(memory, page_size(), PROT_NONE);
    return Stack{static_cast<char*>(memory) + page_size()};
}

// cuda_emu_switch_stack(save, load): push the callee-saved registers (and the SSE/x87 control
// words) on the current stack, store the stack pointer in *save, switch to the stack pointer
// `load` and pop what was pushed there. A new fiber's stack is prepared by initial_frame() so
// that the final `ret` enters fiber_main(). About 20 instructions, versus a system call for
// swapcontext(). System V x86-64 ABI only.
extern "C" void cuda_emu_switch_stack(void** save, void* load);
__asm__(
    ".text\n"
    ".globl cuda_emu_switch_stack\n"
    ".hidden cuda_emu_switch_stack\n"
    ".type cuda_emu_switch_stack, @function\n"
    "cuda_emu_switch_stack:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $8, %rsp\n"
    "    stmxcsr (%rsp)\n"
    "    fnstcw 4(%rsp)\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    ldmxcsr (%rsp)\n"
    "    fldcw 4(%rsp)\n"
    "    addq $8, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size cuda_emu_switch_stack, .-cuda_emu_switch_stack\n");

static void* initial_frame(const Stack& stack, void (*entry)()) {
    auto* top = reinterpret_cast<std::uint64_t*>(stack.lo + kStackSize);  // 16-byte aligned
    top[-1] = 0;                                     // fake return address of entry(): ends backtraces
    top[-2] = reinterpret_cast<std::uint64_t>(entry);  // where `ret` goes
    for (int i = 3; i <= 8; ++i) top[-i] = 0;        // rbp, rbx, r12..r15
    auto* control = reinterpret_cast<std::uint32_t*>(&top[-9]);
    control[0] = 0x1F80;                             // default MXCSR
    control[1] = 0x037F;                             // default x87 control word
    return &top[-9];
}

// AddressSanitizer must be told about every stack switch, or it misreads stack accesses.
static void asan_start_switch(void** fake_stack_save, const void* bottom, std::size_t size) {
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
    (void)fake_stack_save, (void)bottom, (void)size;
#endif
}
static void asan_finish_switch(void* fake_stack_save, const void** bottom_old, std::size_t* size_old) {
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
    (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

struct Worker;
// An asynchronous copy issued and not landed yet: `size` bytes to dst, the last `zfill` of them 0.
struct PendingCopy {
    unsigned char* dst;
    const unsigned char* src;
    std::size_t size, zfill;
    std::uint64_t group;  // the number its group gets when committed
};
enum class State { Ready, Running, AtBarrier, AtWarpOp, AtClusterBarrier, Exited, Faulted };

// One CUDA thread. The ThreadView base is what kernel code reads as threadIdx, blockIdx, ...
struct Fiber : ThreadView {
    Worker* worker = nullptr;
    int tid = 0;  // linear thread id in the block: x + y * blockDim.x + z * blockDim.x * blockDim.y
    State state = State::Ready;
    Stack stack;
    void* sp = nullptr;  // saved stack pointer while switched out
    void* asan_fake_stack = nullptr;
    Site site{nullptr, 0};  // where it waits (barrier or warp operation)
    int barrier_result = 0;
    WarpOp op = WarpOp::SyncWarp;  // the warp operation it waits in, with its operands
    unsigned mask = 0;
    std::uint64_t value = 0, result = 0;
    int lane_arg = 0, width = 32;
    std::vector<PendingCopy> pending_copies;       // its asynchronous copies not landed yet (5c)
    std::uint64_t committed_groups = 0;              // groups of them committed so far
    Site cluster_arrive_site{nullptr, 0};  // its arrive at the split cluster barrier, not yet waited (5b)
    ~Fiber() {
        if (stack.lo) munmap(stack.lo - page_size(), kStackSize + page_size());
    }
};

// =============================================================================================
// 3. Launch, Team and Worker
// =============================================================================================
enum class Order { Forward = 0, Reverse = 1, Random = 2 };

struct Launch {
    const Kernel* kernel = nullptr;
    unsigned grid[3] = {1, 1, 1}, block[3] = {1, 1, 1};
    unsigned cluster[3] = {1, 1, 1};  // blocks per cluster in x, y, z: (1,1,1) without __cluster_dims__
    unsigned cluster_size = 1;        // their product
    const ArgSlot* args = nullptr;
    std::size_t shared_bytes = 0;
    Order order = Order::Forward;
    std::uint64_t seed = 0;
    std::uint64_t cluster_count = 0;  // clusters in the grid (= blocks without __cluster_dims__)
    std::uint64_t permute_mul = 1, permute_add = 0;  // "random" cluster order: (mul * i + add) % count

    std::atomic<std::uint64_t> next_cluster{0}, clusters_done{0};
    std::atomic<bool> stop{false}, timed_out{false};
    double timeout_seconds = 0;

    std::mutex mutex;  // guards the fault record below
    bool failed = false;
    std::uint64_t failed_sequence = 0;  // position of the failing cluster in the launch order
    std::string message;
    std::uintptr_t fault_pc = 0;

    std::uint64_t cluster_at(std::uint64_t sequence) const {
        switch (order) {
            case Order::Forward: return sequence;
            case Order::Reverse: return cluster_count - 1 - sequence;
            case Order::Random: break;
        }
        auto scrambled = std::uint64_t((unsigned __int128)sequence * permute_mul % cluster_count);
        return (scrambled + permute_add) % cluster_count;
    }

    // Keeps the error of the cluster that comes first in the launch order (so that the report does
    // not depend on which worker got there first) and stops the launch.
    void record_failure(std::uint64_t sequence, const unsigned* block_idx, const std::string& thread,
                        const char* what, std::uintptr_t pc) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!failed || sequence < failed_sequence) {
            char prefix[256];
            std::snprintf(prefix, sizeof prefix, "kernel %s block (%u,%u,%u) thread %s: ",
                          kernel->name.c_str(), block_idx[0], block_idx[1], block_idx[2], thread.c_str());
            failed = true;
            failed_sequence = sequence;
            message = prefix + std::string(what);
            fault_pc = pc;
        }
        stop = true;
    }
};

struct OpenWarpOp {  // a warp operation some lanes of one warp have arrived at
    int warp;
    WarpOp op;
    unsigned mask, arrived;
    Site site;
    int first_lane;
};

struct TlsBlock {  // this module's thread-local storage in one OS thread: see section 8
    unsigned char* data;
    std::size_t size;
};

// Where a block of the team's current cluster stands.
enum class Standing { NotStarted, Runnable, AtClusterSync, Exited };

struct Team;

struct Worker {
    Launch* launch = nullptr;
    Team* team = nullptr;
    int rank = 0;  // in the team: the rank in the cluster of the blocks it runs
    TlsBlock tls{nullptr, 0};  // its OS thread's: the shared memory of its blocks
    std::condition_variable turn_changed;  // (waited on with the team's mutex)
    std::vector<std::unique_ptr<Fiber>> fibers;  // grows to the largest block seen, then reused
    int nthreads = 0;
    unsigned block_idx[3] = {0, 0, 0};
    bool block_active = false;  // a block was started and has not finished
    void* scheduler_sp = nullptr;

    std::uint64_t ready[1024 / 64] = {};  // bit t set: fiber t can be resumed
    int ready_count = 0;
    std::mt19937_64 rng;

    int barrier_arrived = 0, barrier_true = 0;  // the block's barrier
    Site barrier_site{nullptr, 0};
    std::vector<OpenWarpOp> open_ops;
    int cluster_arrived = 0;  // threads of the block waiting at cluster.sync()
    Site cluster_site{nullptr, 0};  // where the first of them waits

    bool block_failed = false;  // the first error of the block, reported by run()
    int fault_tid = -1;         // -1: not attributable to one thread
    std::uintptr_t fault_pc = 0;
    char fault_message[2048] = {};

    void* scheduler_fake_stack = nullptr;  // AddressSanitizer bookkeeping
    const void* main_stack_lo = nullptr;
    std::size_t main_stack_size = 0;

    void run(Launch& l, Team& t, int member_rank);
    Standing take_turn(bool start, std::uint64_t cluster);
    void start_block(std::uint64_t cluster);
    void run_fibers();
    void abandon_block();
    int pick_next();
    void make_ready(Fiber& f);
    void resume(Fiber& f);
    void suspend(Fiber& f);
    void fail(int tid, std::uintptr_t pc, const char* format, ...) __attribute__((format(printf, 4, 5)));
    void vfail(int tid, std::uintptr_t pc, const char* format, va_list args);
    void complete(const OpenWarpOp& group);
    void diagnose_deadlock();
    void poison_shared_memory();
    void check_dynamic_shared(int tid, bool whole_tail);
    std::string thread_name(int tid) const;
    Fiber& lane(int warp, int l) { return *fibers[std::size_t(warp * 32 + l)]; }
};

// The workers that run the blocks of one cluster at a time, member r the block of rank r. Only
// the member whose turn it is runs (kernel code included); the others wait on their condition
// variable. Everything below is guarded by `mutex`.
struct Team {
    Launch* launch = nullptr;
    std::vector<Worker*> members;
    std::mutex mutex;
    int registered = 0;  // members whose OS thread has started (and published its tls)
    bool stop = false;   // no more turns: the launch is done, failed or timed out
    int turn = -1;       // the member that runs now
    std::uint64_t sequence = 0, cluster = 0;  // the current cluster: position in the launch order, index
    std::vector<Standing> standing;           // of each member's block in the current cluster
    std::mt19937_64 rng;                      // "random" order: which block gets the next turn

    int size() const { return int(members.size()); }
    void give_turn(int member);
    int pick_next_block();
    void start_next_cluster();
    void pass_turn();
    void finish();
};

static std::vector<std::unique_ptr<Worker>> g_workers;  // persistent: keeps fiber stacks
static std::mutex g_launch_mutex;                      // one launch at a time per process

static Fiber& me() {
    if (current_thread == nullptr) {
        std::fprintf(stderr, "cuda_emulation: device function called outside a kernel launch\n");
        std::abort();
    }
    return *static_cast<Fiber*>(current_thread);
}

static bool same_site(Site a, Site b) {
    return a.line == b.line && a.file && b.file && std::strcmp(a.file, b.file) == 0;
}

std::string Worker::thread_name(int tid) const {
    if (tid < 0) return "(?,?,?)";
    const unsigned* b = launch->block;
    char text[64];
    std::snprintf(text, sizeof text, "(%u,%u,%u)", unsigned(tid) % b[0], unsigned(tid) / b[0] % b[1],
                  unsigned(tid) / (b[0] * b[1]));
    return text;
}

// =============================================================================================
// 4. Running a block
// =============================================================================================
[[noreturn]] static void fiber_main();
static TlsBlock this_threads_tls_block();

void Team::give_turn(int member) {
    turn = member;
    members[std::size_t(member)]->turn_changed.notify_one();
}

void Team::finish() {
    stop = true;
    turn = -1;
    for (Worker* w : members) w->turn_changed.notify_one();
}

// The block that runs next, among those that can (started or not, not waiting, not exited), by
// the launch's order: the lowest rank ("forward"), the highest ("reverse") or a seeded random one.
int Team::pick_next_block() {
    auto can_run = [&](int r) {
        return standing[std::size_t(r)] == Standing::NotStarted || standing[std::size_t(r)] == Standing::Runnable;
    };
    int count = 0;
    for (int r = 0; r < size(); ++r) count += can_run(r);
    if (count == 0) return -1;
    int k = 0;  // take the k-th of them
    if (launch->order == Order::Reverse) k = count - 1;
    if (launch->order == Order::Random) k = int(rng() % std::uint64_t(count));
    for (int r = 0;; ++r)
        if (can_run(r) && k-- == 0) return r;
}

void Team::start_next_cluster() {
    std::uint64_t next = launch->stop ? launch->cluster_count : launch->next_cluster++;
    if (next >= launch->cluster_count) {
        finish();
        return;
    }
    sequence = next;
    cluster = launch->cluster_at(next);
    standing.assign(members.size(), Standing::NotStarted);
    rng.seed(launch->seed * 0xD1B54A32D192ED03ull + cluster);
    give_turn(pick_next_block());
}

// Called by the member whose turn ended, with its block's standing updated.
void Team::pass_turn() {
    int next = pick_next_block();
    if (next < 0) {  // every block waits at cluster.sync() or has exited
        int exited = 0, waiting = 0, first_exited = -1, first_waiting = -1;
        for (int r = size() - 1; r >= 0; --r) {
            if (standing[std::size_t(r)] == Standing::Exited) ++exited, first_exited = r;
            if (standing[std::size_t(r)] == Standing::AtClusterSync) ++waiting, first_waiting = r;
        }
        if (exited == size()) {  // the cluster is done
            ++launch->clusters_done;
            start_next_cluster();
            return;
        }
        if (exited > 0) {
            const Worker& gone = *members[std::size_t(first_exited)];
            const Site site = members[std::size_t(first_waiting)]->cluster_site;
            char what[1024];
            std::snprintf(what, sizeof what, "deadlock: this block exited without reaching cluster.sync(), "
                          "where %d other block(s) of its cluster wait (at %s:%d); every block of a cluster "
                          "must reach every cluster.sync() (early return before a cluster barrier?)",
                          waiting, site.file, site.line);
            launch->record_failure(sequence, gone.block_idx, "(?,?,?)", what, 0);
            finish();
            return;
        }
        // All wait: the cluster barrier opens. Each block releases its threads on its next turn.
        standing.assign(members.size(), Standing::Runnable);
        next = pick_next_block();
    }
    give_turn(next);
}

// A worker's OS thread: wait for the team to hand it the turn, run its block until the block
// waits at cluster.sync() or is done, hand the turn on; until the team is done.
void Worker::run(Launch& l, Team& t, int member_rank) {
    launch = &l;
    team = &t;
    rank = member_rank;
    block_active = false;
#ifndef __SANITIZE_ADDRESS__  // (ASan gives each thread an alternate signal stack of its own)
    // Signals from a kernel (stack overflow included) are handled on this alternate stack.
    std::vector<char> signal_stack(64 * 1024);
    stack_t alternate{};
    alternate.ss_sp = signal_stack.data();
    alternate.ss_size = signal_stack.size();
    sigaltstack(&alternate, nullptr);
#endif
    current_thread = nullptr;  // touching a TLS variable makes sure this thread's block exists
    tls = this_threads_tls_block();
    // A new thread's shared memory holds the TLS image (zeros), not poison: other blocks of the
    // cluster may read it before this worker's block starts.
    if (t.size() > 1) poison_shared_memory();

    std::unique_lock<std::mutex> lock(t.mutex);
    if (++t.registered == t.size()) t.start_next_cluster();  // all tls published: go
    for (;;) {
        turn_changed.wait(lock, [&] { return t.stop || t.turn == rank; });
        if (t.stop) break;
        const bool start = t.standing[std::size_t(rank)] == Standing::NotStarted;
        const std::uint64_t cluster = t.cluster, sequence = t.sequence;
        lock.unlock();
        const Standing standing = take_turn(start, cluster);
        lock.lock();
        if (block_failed) {
            l.record_failure(sequence, block_idx, thread_name(fault_tid), fault_message, fault_pc);
            t.finish();
            break;
        }
        t.standing[std::size_t(rank)] = standing;
        t.pass_turn();
    }
    lock.unlock();
    if (block_active) abandon_block();
#ifndef __SANITIZE_ADDRESS__
    alternate.ss_flags = SS_DISABLE;
    sigaltstack(&alternate, nullptr);
#endif
}

// One turn: start the block (its first turn) or release its threads from cluster.sync() (the
// barrier opened), then run its threads until none can go on. Returns where the block stands
// then, unless it failed (block_failed).
Standing Worker::take_turn(bool start, std::uint64_t cluster) {
    if (start) {
        start_block(cluster);
    } else {
        for (int t = 0; t < nthreads; ++t)
            if (fibers[std::size_t(t)]->state == State::AtClusterBarrier) make_ready(*fibers[std::size_t(t)]);
        cluster_arrived = 0;
    }
    run_fibers();
    if (block_failed) return Standing::Runnable;
    if (cluster_arrived == nthreads) return Standing::AtClusterSync;
    bool all_exited = true;
    for (int t = 0; t < nthreads; ++t) all_exited &= fibers[std::size_t(t)]->state == State::Exited;
    if (!all_exited) {
        diagnose_deadlock();
        return Standing::Runnable;
    }
    check_dynamic_shared(-1, true);
    if (block_failed) return Standing::Runnable;
    block_active = false;
    // Its shared memory is gone: other blocks of the cluster that still read it read garbage. (No
    // other block can read it in a cluster of one, and the next block fills it anyway.)
    if (team->size() > 1) poison_shared_memory();
    return Standing::Exited;
}

// The block of this worker's rank in `cluster`: a cluster is cluster[0] x cluster[1] x cluster[2]
// consecutive blocks, and clusters are numbered like blocks, x fastest.
void Worker::start_block(std::uint64_t cluster) {
    Launch& l = *launch;
    const unsigned* c = l.cluster;
    const std::uint64_t across = l.grid[0] / c[0], down = l.grid[1] / c[1];  // clusters in x, in y
    block_idx[0] = unsigned(cluster % across) * c[0] + unsigned(rank) % c[0];
    block_idx[1] = unsigned(cluster / across % down) * c[1] + unsigned(rank) / c[0] % c[1];
    block_idx[2] = unsigned(cluster / (across * down)) * c[2] + unsigned(rank) / (c[0] * c[1]);
    const std::uint64_t linear = block_idx[0] + std::uint64_t(l.grid[0]) * (block_idx[1] + std::uint64_t(l.grid[1]) * block_idx[2]);
    nthreads = int(l.block[0] * l.block[1] * l.block[2]);
    while (int(fibers.size()) < nthreads) {
        fibers.push_back(std::make_unique<Fiber>());
        fibers.back()->stack = allocate_stack();
    }

    poison_shared_memory();
    rng.seed(l.seed * 0x9E3779B97F4A7C15ull + linear);
    barrier_arrived = barrier_true = 0;
    open_ops.clear();
    cluster_arrived = 0;
    block_failed = false;
    fault_tid = -1;
    fault_pc = 0;
    std::fill(std::begin(ready), std::end(ready), 0);
    ready_count = 0;
    block_active = true;

    for (int t = 0; t < nthreads; ++t) {
        Fiber& f = *fibers[std::size_t(t)];
        f.worker = this;
        f.tid = t;
        f.thread_idx = uint3(unsigned(t) % l.block[0], unsigned(t) / l.block[0] % l.block[1],
                            unsigned(t) / (l.block[0] * l.block[1]));
        f.block_idx = uint3(block_idx[0], block_idx[1], block_idx[2]);
        f.block_dim = dim3(l.block[0], l.block[1], l.block[2]);
        f.grid_dim = dim3(l.grid[0], l.grid[1], l.grid[2]);
        f.cluster_dim = dim3(c[0], c[1], c[2]);
#ifdef __SANITIZE_ADDRESS__
        // fiber_main() never returns, so ASan's marks for its frame stay on the stack: clear them.
        ASAN_UNPOISON_MEMORY_REGION(f.stack.lo + kStackSize - 16384, 16384);
#endif
        f.pending_copies.clear();  // (copies a thread of the previous block never waited for)
        f.committed_groups = 0;
        f.cluster_arrive_site = Site{nullptr, 0};  // (an arrive the previous block faulted after)
        f.sp = initial_frame(f.stack, fiber_main);
        make_ready(f);
    }
}

void Worker::run_fibers() {
    Launch& l = *launch;
    while (!block_failed) {
        if (l.timed_out) {
            fail(-1, 0, "timed out after %g s", l.timeout_seconds);
            break;
        }
        int t = pick_next();
        if (t < 0) break;
        resume(*fibers[std::size_t(t)]);
        if (!block_failed) check_dynamic_shared(t, false);
    }
}

// A block left unfinished (it failed, or another block of its cluster did).
void Worker::abandon_block() {
    block_active = false;
#ifdef __SANITIZE_ADDRESS__
    // Its fibers never unwound: clear their stale stack poisoning.
    for (int t = 0; t < nthreads; ++t) ASAN_UNPOISON_MEMORY_REGION(fibers[std::size_t(t)]->stack.lo, kStackSize);
#endif
}

void Worker::make_ready(Fiber& f) {
    f.state = State::Ready;
    ready[f.tid / 64] |= 1ull << (f.tid % 64);
    ++ready_count;
}

// The launch order decides which ready fiber runs next: the lowest thread id ("forward"), the
// highest ("reverse") or a seeded random one ("random").
int Worker::pick_next() {
    if (ready_count == 0) return -1;
    int words = (nthreads + 63) / 64;
    int chosen = -1;
    if (launch->order == Order::Forward) {
        for (int w = 0; w < words && chosen < 0; ++w)
            if (ready[w]) chosen = w * 64 + __builtin_ctzll(ready[w]);
    } else if (launch->order == Order::Reverse) {
        for (int w = words - 1; w >= 0 && chosen < 0; --w)
            if (ready[w]) chosen = w * 64 + 63 - __builtin_clzll(ready[w]);
    } else {
        int k = int(rng() % std::uint64_t(ready_count));  // the k-th ready fiber
        for (int w = 0; w < words && chosen < 0; ++w) {
            int n = __builtin_popcountll(ready[w]);
            if (k >= n) { k -= n; continue; }
            std::uint64_t bits = ready[w];
            for (; k > 0; --k) bits &= bits - 1;
            chosen = w * 64 + __builtin_ctzll(bits);
        }
    }
    ready[chosen / 64] &= ~(1ull << (chosen % 64));
    --ready_count;
    return chosen;
}

// Scheduler -> fiber. Returns when the fiber suspends (waits, exits or faults).
void Worker::resume(Fiber& f) {
    f.state = State::Running;
    current_thread = &f;
    asan_start_switch(&scheduler_fake_stack, f.stack.lo, kStackSize);
    cuda_emu_switch_stack(&scheduler_sp, f.sp);
    asan_finish_switch(scheduler_fake_stack, nullptr, nullptr);
    current_thread = nullptr;
}

// Fiber -> scheduler. Returns when the scheduler resumes this fiber (never if it has finished).
void Worker::suspend(Fiber& f) {
    bool finished = f.state == State::Exited || f.state == State::Faulted;
    asan_start_switch(finished ? nullptr : &f.asan_fake_stack, main_stack_lo, main_stack_size);
    cuda_emu_switch_stack(&f.sp, scheduler_sp);
    asan_finish_switch(f.asan_fake_stack, &main_stack_lo, &main_stack_size);
}

[[noreturn]] static void fiber_main() {
    Fiber& f = me();
    Worker& w = *f.worker;
    asan_finish_switch(nullptr, &w.main_stack_lo, &w.main_stack_size);
    char exception_text[512] = "";
    try {
        w.launch->kernel->invoke(w.launch->kernel->function, w.launch->args);
    } catch (const std::exception& e) {
        std::snprintf(exception_text, sizeof exception_text, "C++ exception: %s", e.what());
    } catch (...) {
        std::snprintf(exception_text, sizeof exception_text, "C++ exception of unknown type");
    }
    if (exception_text[0]) fault("%s", exception_text);
    if (f.cluster_arrive_site.file)
        fault("exited after arriving at the split cluster barrier at %s:%d without waiting (__cluster_barrier_wait)",
              f.cluster_arrive_site.file, f.cluster_arrive_site.line);
    f.state = State::Exited;
    w.suspend(f);
    std::abort();  // an exited fiber is never resumed
}

// =============================================================================================
// 5. Barriers and warp operations (running on the calling fiber's stack)
// =============================================================================================
int block_barrier(int predicate, Site site) {
    Fiber& f = me();
    Worker& w = *f.worker;
    if (w.barrier_arrived > 0 && !same_site(w.barrier_site, site)) {
        int waiting = 0;
        while (w.fibers[std::size_t(waiting)]->state != State::AtBarrier) ++waiting;
        fault("barrier divergence: waits at __syncthreads() at %s:%d while thread %s waits at "
              "__syncthreads() at %s:%d; all threads of a block must reach the same barrier",
              site.file, site.line, w.thread_name(waiting).c_str(), w.barrier_site.file,
              w.barrier_site.line);
    }
    if (w.barrier_arrived == 0) {
        w.barrier_site = site;
        w.barrier_true = 0;
    }
    ++w.barrier_arrived;
    w.barrier_true += predicate;
    f.state = State::AtBarrier;
    f.site = site;
    if (w.barrier_arrived == w.nthreads) {  // the last thread arrived: release everybody
        for (int t = 0; t < w.nthreads; ++t) {
            w.fibers[std::size_t(t)]->barrier_result = w.barrier_true;
            w.make_ready(*w.fibers[std::size_t(t)]);
        }
        w.barrier_arrived = 0;
    }
    w.suspend(f);
    return f.barrier_result;
}

static const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::ShflIdx: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
        case WarpOp::SyncWarp: return "__syncwarp";
    }
    return "?";
}

static bool is_shuffle(WarpOp op) {
    return op == WarpOp::ShflIdx || op == WarpOp::ShflUp || op == WarpOp::ShflDown || op == WarpOp::ShflXor;
}

std::uint64_t warp_op(WarpOp op, unsigned mask, std::uint64_t value, int lane_arg, int width, Site site) {
    Fiber& f = me();
    Worker& w = *f.worker;
    const int warp = f.tid / 32, lane = f.tid % 32;
    const char* name = op_name(op);
    if (!(mask >> lane & 1u))
        fault("%s at %s:%d: mask 0x%08x does not include the calling lane %d", name, site.file,
              site.line, mask, lane);
    if (is_shuffle(op) && (width < 1 || width > 32 || (width & (width - 1)) != 0))
        fault("%s at %s:%d: width %d is not a power of two between 1 and 32", name, site.file,
              site.line, width);
    for (int l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        int t = warp * 32 + l;
        if (t >= w.nthreads)
            fault("%s at %s:%d: mask 0x%08x names lane %d, which does not exist (the block has %d threads)",
                  name, site.file, site.line, mask, l, w.nthreads);
        if (w.fibers[std::size_t(t)]->state == State::Exited)
            fault("%s at %s:%d: mask 0x%08x names lane %d (thread %s), which has already exited", name,
                  site.file, site.line, mask, l, w.thread_name(t).c_str());
    }

    OpenWarpOp* group = nullptr;
    for (OpenWarpOp& g : w.open_ops)
        if (g.warp == warp && (g.mask & mask) != 0) group = &g;
    if (group != nullptr && group->mask != mask)
        fault("shuffle mask mismatch: %s at %s:%d uses mask 0x%08x, but lane %d waits in %s at %s:%d "
              "with mask 0x%08x", name, site.file, site.line, mask, group->first_lane,
              op_name(group->op), group->site.file, group->site.line, group->mask);
    if (group != nullptr && group->op != op)
        fault("warp operation mismatch: %s at %s:%d, but lane %d waits in %s at %s:%d with the same "
              "mask 0x%08x", name, site.file, site.line, group->first_lane, op_name(group->op),
              group->site.file, group->site.line, mask);
    if (group == nullptr) {
        w.open_ops.push_back(OpenWarpOp{warp, op, mask, 0u, site, lane});
        group = &w.open_ops.back();
    }

    f.op = op;
    f.mask = mask;
    f.value = value;
    f.lane_arg = lane_arg;
    f.width = width;
    f.site = site;
    f.state = State::AtWarpOp;
    group->arrived |= 1u << lane;
    if (group->arrived == mask) {  // the last lane arrived
        w.complete(*group);
        w.open_ops.erase(w.open_ops.begin() + (group - w.open_ops.data()));
    }
    w.suspend(f);
    return f.result;
}

// Source lane of a shuffle, as the PTX ISA defines shfl.sync (c = ((32 - width) << 8) | 0x1f,
// except shfl.up where the low bits are 0). Out-of-segment sources return the lane's own value.
static int shuffle_source(WarpOp op, int lane, int lane_arg, int width) {
    const int segmask = (32 - width) & 31, b = lane_arg & 31;
    const int min_lane = lane & segmask;
    const int max_lane = op == WarpOp::ShflUp ? min_lane : (min_lane | (31 & ~segmask));
    int j = lane;
    bool valid = false;
    switch (op) {
        case WarpOp::ShflUp: j = lane - b; valid = j >= max_lane; break;
        case WarpOp::ShflDown: j = lane + b; valid = j <= max_lane; break;
        case WarpOp::ShflXor: j = lane ^ b; valid = j <= max_lane; break;
        case WarpOp::ShflIdx: j = min_lane | (b & ~segmask); valid = j <= max_lane; break;
        default: break;
    }
    return valid ? j : lane;
}

void Worker::complete(const OpenWarpOp& group) {
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
        if ((group.mask >> l & 1u) && lane(group.warp, l).value != 0) ballot |= 1u << l;
    for (int l = 0; l < 32; ++l) {
        if (!(group.mask >> l & 1u)) continue;
        Fiber& f = lane(group.warp, l);
        switch (group.op) {
            case WarpOp::Ballot: f.result = ballot; break;
            case WarpOp::Any: f.result = ballot != 0; break;
            case WarpOp::All: f.result = ballot == group.mask; break;
            case WarpOp::SyncWarp: f.result = 0; break;
            default: {
                int source = shuffle_source(group.op, l, f.lane_arg, f.width);
                // A source lane outside the mask has no defined value: all bits set (NaN).
                f.result = (group.mask >> source & 1u) ? lane(group.warp, source).value : ~0ull;
            }
        }
        make_ready(f);
    }
}

unsigned active_mask() {
    Fiber& f = me();
    Worker& w = *f.worker;
    unsigned mask = 0;
    for (int l = 0; l < 32; ++l) {
        int t = f.tid / 32 * 32 + l;
        if (t < w.nthreads && w.fibers[std::size_t(t)]->state != State::Exited) mask |= 1u << l;
    }
    return mask;
}

// ---------------------------------------------------------------------------------------------
// 5b. Thread block clusters. A thread at cluster.sync() waits until every thread of its block is
//     there; then the block waits for the other blocks of the cluster (section 4: Team). The
//     call sites may differ: CUDA's cluster barrier is not `.aligned`.
// ---------------------------------------------------------------------------------------------
void cluster_barrier(Site site) {
    Fiber& f = me();
    Worker& w = *f.worker;
    if (f.cluster_arrive_site.file)
        fault("cluster.sync() at %s:%d after arriving at the split cluster barrier at %s:%d without waiting",
              site.file, site.line, f.cluster_arrive_site.file, f.cluster_arrive_site.line);
    if (w.cluster_arrived == 0) w.cluster_site = site;
    ++w.cluster_arrived;
    f.state = State::AtClusterBarrier;
    f.site = site;
    w.suspend(f);
}

// The split barrier: the arrive is recorded, and the thread joins the barrier at its wait, so
// whatever it runs between the two runs before the barrier (see cuda_emulation.h).
void cluster_barrier_arrive(Site site) {
    Fiber& f = me();
    if (f.cluster_arrive_site.file)
        fault("__cluster_barrier_arrive at %s:%d: this thread arrived at %s:%d and has not waited since",
              site.file, site.line, f.cluster_arrive_site.file, f.cluster_arrive_site.line);
    f.cluster_arrive_site = site;
}

void cluster_barrier_wait(Site site) {
    Fiber& f = me();
    if (!f.cluster_arrive_site.file)
        fault("__cluster_barrier_wait at %s:%d without an arrive (__cluster_barrier_arrive) before it", site.file,
              site.line);
    f.cluster_arrive_site = Site{nullptr, 0};
    cluster_barrier(site);
}

// The other members' tls fields are read without the team's mutex: each was set before that
// member registered, and the first turn of the launch comes after every member registered.
void* map_shared_rank(const void* address, long long rank, Site site) {
    Fiber& f = me();
    Worker& w = *f.worker;
    const Team& t = *w.team;
    if (rank < 0 || rank >= t.size())
        fault("map_shared_rank(%p, %lld) at %s:%d: rank %lld is out of range: the cluster has %d block(s), "
              "ranks 0 to %d", address, rank, site.file, site.line, rank, t.size(), t.size() - 1);
    auto* p = static_cast<const unsigned char*>(address);
    if (p < w.tls.data || p > w.tls.data + w.tls.size)  // (one past the end is a pointer too)
        fault("map_shared_rank(%p, %lld) at %s:%d: %p is not an address in this block's shared memory",
              address, rank, site.file, site.line, address);
    return t.members[std::size_t(rank)]->tls.data + (p - w.tls.data);
}

unsigned query_shared_rank(const void* address, Site site) {
    Fiber& f = me();
    const Team& t = *f.worker->team;
    auto* p = static_cast<const unsigned char*>(address);
    for (int r = 0; r < t.size(); ++r) {
        const TlsBlock& tls = t.members[std::size_t(r)]->tls;
        if (p >= tls.data && p < tls.data + tls.size) return unsigned(r);
    }
    fault("query_shared_rank(%p) at %s:%d: not an address in the shared memory of a block of the cluster",
          address, site.file, site.line);
}

// ---------------------------------------------------------------------------------------------
// 5c. Asynchronous copies (cuda_pipeline_primitives.h). A copy may land anywhere between its issue
//     and its thread's wait for its group; the launch's order picks the end (cuda_emulation.h):
//     the wait in "forward", the issue in "reverse", either (seeded) in "random".
// ---------------------------------------------------------------------------------------------
static void land(const PendingCopy& c) {
    std::memcpy(c.dst, c.src, c.size - c.zfill);
    std::memset(c.dst + (c.size - c.zfill), 0, c.zfill);
}

void async_copy(void* dst, const void* src, std::size_t size, std::size_t zfill, Site site) {
    Fiber& f = me();
    Worker& w = *f.worker;
    if (size != 4 && size != 8 && size != 16)
        fault("__pipeline_memcpy_async at %s:%d: %zu bytes; an asynchronous copy moves 4, 8 or 16",
              site.file, site.line, size);
    if (zfill > size)
        fault("__pipeline_memcpy_async at %s:%d: zfill %zu is more than the %zu bytes copied", site.file,
              site.line, zfill, size);
    auto* to = static_cast<unsigned char*>(dst);
    if (to < w.tls.data || to + size > w.tls.data + w.tls.size)
        fault("__pipeline_memcpy_async at %s:%d: the destination %p is not in this block's shared memory",
              site.file, site.line, dst);
    check_aligned(dst, size, "__pipeline_memcpy_async", "copy to", site);
    check_aligned(src, size, "__pipeline_memcpy_async", "copy from", site);
    const PendingCopy copy{to, static_cast<const unsigned char*>(src), size, zfill, f.committed_groups};
    const Order order = w.launch->order;
    if (order == Order::Reverse || (order == Order::Random && (w.rng() & 1)))
        land(copy);
    else
        f.pending_copies.push_back(copy);
}

void async_commit() { ++me().committed_groups; }

// prior >= 8 waits as for 8, as in the toolkit's header.
void async_wait_prior(std::size_t prior) {
    Fiber& f = me();
    const std::uint64_t keep = std::min<std::size_t>(prior, 8);
    // Groups numbered below committed - keep have landed; the open group never waits.
    const std::uint64_t done = f.committed_groups > keep ? f.committed_groups - keep : 0;
    std::size_t kept = 0;
    for (const PendingCopy& c : f.pending_copies) {
        if (c.group < done) land(c);
        else f.pending_copies[kept++] = c;
    }
    f.pending_copies.resize(kept);
}

// =============================================================================================
// 6. Deadlocks: nothing is ready, yet some threads have not finished (and not all of them wait
//    at cluster.sync(): then the block waits for its cluster, section 4).
// =============================================================================================
void Worker::diagnose_deadlock() {
    int exited = -1, at_barrier = -1, at_warp_op = -1, at_cluster = -1, waiting = 0;
    for (int t = nthreads - 1; t >= 0; --t) {
        State s = fibers[std::size_t(t)]->state;
        if (s == State::Exited) exited = t;
        if (s == State::AtBarrier) at_barrier = t, ++waiting;
        if (s == State::AtWarpOp) at_warp_op = t;
        if (s == State::AtClusterBarrier) at_cluster = t;
    }
    if (at_barrier >= 0 && exited >= 0) {
        fail(exited, 0, "deadlock: this thread exited without reaching __syncthreads() at %s:%d, where "
             "%d threads wait (early return before a barrier?)", barrier_site.file, barrier_site.line,
             waiting);
        return;
    }
    if (at_warp_op >= 0) {
        const Fiber& f = *fibers[std::size_t(at_warp_op)];
        int warp = f.tid / 32, missing = 0;
        for (const OpenWarpOp& g : open_ops)
            if (g.warp == warp && (g.mask >> (f.tid % 32) & 1u))
                while (!((g.mask & ~g.arrived) >> missing & 1u)) ++missing;
        const Fiber& other = lane(warp, missing);
        char state[512];
        if (other.state == State::AtBarrier)
            std::snprintf(state, sizeof state, "waits at __syncthreads() at %s:%d", other.site.file,
                          other.site.line);
        else if (other.state == State::AtClusterBarrier)
            std::snprintf(state, sizeof state, "waits at cluster.sync() at %s:%d", other.site.file,
                          other.site.line);
        else if (other.state == State::Exited)
            std::snprintf(state, sizeof state, "has exited");
        else
            std::snprintf(state, sizeof state, "waits in %s at %s:%d", op_name(other.op),
                          other.site.file, other.site.line);
        fail(f.tid, 0, "deadlock: waits in %s at %s:%d (mask 0x%08x) for lane %d (thread %s), which %s",
             op_name(f.op), f.site.file, f.site.line, f.mask, missing, thread_name(other.tid).c_str(),
             state);
        return;
    }
    if (at_barrier >= 0 && at_cluster >= 0) {
        const Fiber& other = *fibers[std::size_t(at_cluster)];
        fail(at_barrier, 0, "deadlock: waits at __syncthreads() at %s:%d while thread %s waits at "
             "cluster.sync() at %s:%d", barrier_site.file, barrier_site.line,
             thread_name(at_cluster).c_str(), other.site.file, other.site.line);
        return;
    }
    if (at_cluster >= 0 && exited >= 0) {
        fail(exited, 0, "deadlock: this thread exited without reaching cluster.sync() at %s:%d, where %d "
             "threads of its block wait; every thread of every block of a cluster must reach it (early "
             "return before a cluster barrier?)", cluster_site.file, cluster_site.line, cluster_arrived);
        return;
    }
    fail(at_barrier, 0, "deadlock at __syncthreads() at %s:%d", barrier_site.file, barrier_site.line);
}

// =============================================================================================
// 7. Faults
// =============================================================================================
void Worker::vfail(int tid, std::uintptr_t pc, const char* format, va_list args) {
    if (block_failed) return;  // the first error of a block is the one reported
    block_failed = true;
    fault_tid = tid;
    fault_pc = pc;
    std::vsnprintf(fault_message, sizeof fault_message, format, args);
}

void Worker::fail(int tid, std::uintptr_t pc, const char* format, ...) {
    va_list args;
    va_start(args, format);
    vfail(tid, pc, format, args);
    va_end(args);
}

// Records the error and leaves the fiber for good; its block is abandoned.
[[noreturn]] static void end_fiber(std::uintptr_t pc, const char* format, va_list args) {
    Fiber& f = me();
    f.worker->vfail(f.tid, pc, format, args);
    f.state = State::Faulted;
    f.worker->suspend(f);
    std::abort();  // never resumed
}

void fault(const char* format, ...) {
    va_list args;
    va_start(args, format);
    end_fiber(0, format, args);
}

[[noreturn]] static void fault_at(std::uintptr_t pc, const char* format, ...)
    __attribute__((format(printf, 2, 3)));
static void fault_at(std::uintptr_t pc, const char* format, ...) {
    va_list args;
    va_start(args, format);
    end_fiber(pc, format, args);
}

__attribute__((noinline)) void misaligned_access(const void* address, std::size_t alignment,
                                                 const char* type, const char* access, Site site) {
    auto remainder = reinterpret_cast<std::uintptr_t>(address) % alignment;
    if (site.file)
        fault("misaligned %s %s address %p (needs %zu-byte alignment; address %% %zu = %zu) at %s:%d",
              type, access, address, alignment, alignment, std::size_t(remainder), site.file, site.line);
    // No call site known (vector stores): report the code address (of the call instruction), which
    // Python turns into file:line.
    fault_at(reinterpret_cast<std::uintptr_t>(__builtin_return_address(0)) - 1,
             "misaligned %s %s address %p (needs %zu-byte alignment; address %% %zu = %zu)", type,
             access, address, alignment, alignment, std::size_t(remainder));
}

// Signals raised by kernel code end the faulting fiber like fault() does (we leave the handler by
// switching stacks, as siglongjmp would). Signals from anywhere else go to the previous handler.
static const int kFaultSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
static int timeout_signal() { return SIGRTMIN + 3; }
static struct sigaction g_previous[NSIG];

static void on_signal(int sig, siginfo_t* info, void* context) {
    const auto& registers = static_cast<ucontext_t*>(context)->uc_mcontext.gregs;
    auto pc = std::uintptr_t(registers[REG_RIP]);
    auto sp = reinterpret_cast<char*>(registers[REG_RSP]);
    auto* f = static_cast<Fiber*>(current_thread);
    bool on_fiber_stack = f && sp >= f->stack.lo - page_size() && sp < f->stack.lo + kStackSize;
    if (!on_fiber_stack) {  // not kernel code (the scheduler, or another thread of the process)
        if (sig != timeout_signal()) sigaction(sig, &g_previous[sig], nullptr);  // re-fault there
        return;
    }
    auto address = reinterpret_cast<char*>(info->si_addr);
    if (sig == timeout_signal())
        fault_at(pc, "timed out after %g s (endless loop, or spinning on another thread of the block or "
                 "cluster?)",
                 f->worker->launch->timeout_seconds);
    if (sig == SIGSEGV && address < f->stack.lo && address >= f->stack.lo - page_size())
        fault_at(pc, "stack overflow (a CUDA thread's stack is %zu KiB here)", kStackSize / 1024);
    if (sig == SIGSEGV) fault_at(pc, "invalid memory access (SIGSEGV) at address %p", info->si_addr);
    if (sig == SIGBUS) fault_at(pc, "bus error (SIGBUS) at address %p", info->si_addr);
    if (sig == SIGFPE) fault_at(pc, "arithmetic exception (SIGFPE; integer division by zero?)");
    fault_at(pc, "illegal instruction (SIGILL)");
}

// The fault signals are not blocked in their handler (SA_NODEFER), which never returns: it
// switches to the scheduler's stack, so a blocked signal would stay blocked for the thread's
// next fault.  The timeout signal is blocked in its handler: the watchdog sends it every 20 ms,
// and real-time signals queue, so a worker that got no CPU for half a second had a frame set up
// on its 64 KiB alternate stack for each queued copy at once, nested, and overflowed it (the
// whole process segfaulted).  One copy ends the fiber; the worker then leaves its block and its
// thread ends with the signal still blocked and the other copies pending, which is harmless.
static void install_signal_handlers(bool install) {
    struct sigaction action{};
    action.sa_sigaction = on_signal;
    sigemptyset(&action.sa_mask);
    std::vector<int> signals = {timeout_signal()};
#ifndef __SANITIZE_ADDRESS__  // with ASan, its own handler reports faults better (with a stack)
    signals.insert(signals.end(), std::begin(kFaultSignals), std::end(kFaultSignals));
#endif
    for (int sig : signals) {
        action.sa_flags = SA_SIGINFO | SA_ONSTACK | (sig == timeout_signal() ? 0 : SA_NODEFER);
        if (install) sigaction(sig, &action, &g_previous[sig]);
        else sigaction(sig, &g_previous[sig], nullptr);
    }
}

// assert() in kernel code: glibc's assert macro calls __assert_fail. This hidden definition wins
// for every call from this shared object and is invisible to the rest of the process.
extern "C" __attribute__((visibility("hidden"))) void __assert_fail(
    const char* assertion, const char* file, unsigned int line, const char* function) noexcept {
    if (current_thread == nullptr) {
        std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, assertion);
        std::abort();
    }
    fault("assertion `%s' failed at %s:%u in %s", assertion, file, line, function);
}

#ifdef __SANITIZE_ADDRESS__
// With ASan, a report ends the process. Before that, write the report to a file for Python,
// prefixed with the CUDA thread that was running.
static char g_asan_report_path[4096];
static void on_asan_report(const char* report) {
    int fd = open(g_asan_report_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return;
    if (current_thread != nullptr) {
        Fiber& f = me();
        Worker& w = *f.worker;
        char context[512];
        int n = std::snprintf(context, sizeof context,
                              "cuda_emulation: kernel %s block (%u,%u,%u) thread %s\n",
                              w.launch->kernel->name.c_str(), w.block_idx[0], w.block_idx[1],
                              w.block_idx[2], w.thread_name(f.tid).c_str());
        if (write(fd, context, std::size_t(n)) < 0) {}
    }
    // Name dynamic shared memory overruns in its own terms (ASan sees one big thread-local block).
    auto* address = static_cast<unsigned char*>(__asan_get_report_address());
    if (current_thread != nullptr && address >= cuda_emu_dynamic_shared &&
        address < cuda_emu_dynamic_shared + cuda_emu_dynamic_shared_capacity) {
        char line[256];
        int n = std::snprintf(line, sizeof line, "cuda_emulation: dynamic shared memory overrun: byte %zu "
                              "accessed, but the launch gave shared_bytes=%zu\n",
                              std::size_t(address - cuda_emu_dynamic_shared),
                              me().worker->launch->shared_bytes);
        if (write(fd, line, std::size_t(n)) < 0) {}
    }
    if (write(fd, report, std::strlen(report)) < 0) {}
    close(fd);
}
#endif

// =============================================================================================
// 8. Shared memory. Every __shared__ variable is thread_local (cuda_emulation.h), so all of them
//    live in this module's TLS block for the worker thread: filling that block with 0xFF before
//    each block poisons all shared memory at once (in a cluster, also when the block exits).
//    `extern __shared__` names are aliases of cuda_emu_dynamic_shared (declared at the top). All
//    workers' TLS blocks have the same layout, so the same offset in another worker's TLS block
//    is the same variable in another block of the cluster (map_shared_rank, section 5b).
// =============================================================================================
constexpr std::size_t kMaxDynamicShared = 227 * 1024;  // as on H100; beyond it: guard bytes
constexpr std::size_t kGuardCheckBytes = 1024;  // checked after every slice, the rest per block

// (Called once per worker thread, by Worker::run; the block stays where it is for the thread's
// lifetime.)
static TlsBlock this_threads_tls_block() {
    static void* module = nullptr;
    static std::size_t size = 0;
    static std::once_flag once;
    std::call_once(once, [] {
        Dl_info info{};
        dladdr(reinterpret_cast<void*>(&this_threads_tls_block), &info);
        module = dlopen(info.dli_fname, RTLD_NOLOAD | RTLD_LAZY);
        struct Search { const void* base; std::size_t size; } search{info.dli_fbase, 0};
        dl_iterate_phdr([](dl_phdr_info* object, std::size_t, void* data) {
            auto* s = static_cast<Search*>(data);
            if (reinterpret_cast<const void*>(object->dlpi_addr) != s->base) return 0;
            for (int i = 0; i < object->dlpi_phnum; ++i)
                if (object->dlpi_phdr[i].p_type == PT_TLS) s->size = object->dlpi_phdr[i].p_memsz;
            return 1;
        }, &search);
        size = search.size;
    });
    void* data = nullptr;
    dlinfo(module, RTLD_DI_TLS_DATA, &data);
    return TlsBlock{static_cast<unsigned char*>(data), size};
}

void Worker::poison_shared_memory() {
#ifdef __SANITIZE_ADDRESS__
    ASAN_UNPOISON_MEMORY_REGION(tls.data, tls.size);
#endif
    std::memset(tls.data, 0xFF, tls.size);
    current_thread = nullptr;  // the runtime's own thread-local variable, restored
#ifdef __SANITIZE_ADDRESS__
    // Any access past the launch's dynamic shared size is an ASan error (use-after-poison).
    ASAN_POISON_MEMORY_REGION(cuda_emu_dynamic_shared + launch->shared_bytes,
                              cuda_emu_dynamic_shared_capacity - launch->shared_bytes);
#endif
}

// Without ASan: look for bytes that are no longer 0xFF past the dynamic shared size.
void Worker::check_dynamic_shared(int tid, bool whole_tail) {
#ifndef __SANITIZE_ADDRESS__
    static const std::vector<unsigned char> poison(kGuardCheckBytes, 0xFF);
    std::size_t begin = launch->shared_bytes, end = cuda_emu_dynamic_shared_capacity;
    if (!whole_tail) end = std::min(end, begin + kGuardCheckBytes);
    for (std::size_t chunk = begin; chunk < end; chunk += kGuardCheckBytes) {
        std::size_t n = std::min(kGuardCheckBytes, end - chunk);
        if (std::memcmp(cuda_emu_dynamic_shared + chunk, poison.data(), n) == 0) continue;
        std::size_t i = chunk;
        while (cuda_emu_dynamic_shared[i] == 0xFF) ++i;
        fail(tid, 0, "dynamic shared memory overrun: byte %zu was written, but the launch gave "
             "shared_bytes=%zu", i, launch->shared_bytes);
        return;
    }
#else
    (void)tid, (void)whole_tail;
#endif
}

// =============================================================================================
// 9. C interface for Python (ctypes)
// =============================================================================================
static int launch_kernel(int kernel_index, const unsigned* grid, const unsigned* block,
                         const ArgSlot* args, std::uint64_t shared_bytes, int order, std::uint64_t seed,
                         double timeout_seconds, std::string& message, std::uintptr_t& pc) {
    if (kernel_index < 0 || kernel_index >= int(kernels().size())) {
        message = "no such kernel";
        return 2;
    }
    const Kernel& kernel = kernels()[std::size_t(kernel_index)];
    const std::uint64_t threads = std::uint64_t(block[0]) * block[1] * block[2];
    char text[512] = "";
    if (threads == 0 || threads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64)
        std::snprintf(text, sizeof text, "invalid block (%u,%u,%u): at most (1024,1024,64) and 1024 "
                      "threads", block[0], block[1], block[2]);
    else if (kernel.max_threads > 0 && threads > std::uint64_t(kernel.max_threads))
        std::snprintf(text, sizeof text, "block of %llu threads exceeds __launch_bounds__(%d) of %s",
                      (unsigned long long)threads, kernel.max_threads, kernel.name.c_str());
    else if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 ||
             grid[2] > 65535)
        std::snprintf(text, sizeof text, "invalid grid (%u,%u,%u)", grid[0], grid[1], grid[2]);
    else if (shared_bytes > kMaxDynamicShared)
        std::snprintf(text, sizeof text, "shared_bytes=%llu exceeds the %zu bytes of dynamic shared memory",
                      (unsigned long long)shared_bytes, kMaxDynamicShared);
    else if (order < 0 || order > 2)
        std::snprintf(text, sizeof text, "invalid order %d", order);
    else if (kernel.cluster[0] && (grid[0] % kernel.cluster[0] || grid[1] % kernel.cluster[1] ||
                                   grid[2] % kernel.cluster[2]))  // (CUDA refuses the launch too)
        std::snprintf(text, sizeof text, "grid (%u,%u,%u) is not a multiple of the cluster dimensions "
                      "__cluster_dims__(%u,%u,%u) of %s", grid[0], grid[1], grid[2], kernel.cluster[0],
                      kernel.cluster[1], kernel.cluster[2], kernel.name.c_str());
    if (text[0]) {
        message = text;
        return 2;
    }

    std::lock_guard<std::mutex> one_launch_at_a_time(g_launch_mutex);
    Launch l;
    l.kernel = &kernel;
    std::copy(grid, grid + 3, l.grid);
    std::copy(block, block + 3, l.block);
    l.args = args;
    l.shared_bytes = shared_bytes;
    l.order = Order(order);
    l.seed = seed;
    l.timeout_seconds = timeout_seconds;
    if (kernel.cluster[0]) std::copy(kernel.cluster, kernel.cluster + 3, l.cluster);
    l.cluster_size = l.cluster[0] * l.cluster[1] * l.cluster[2];
    l.cluster_count = std::uint64_t(grid[0]) * grid[1] * grid[2] / l.cluster_size;
    if (l.order == Order::Random) {  // an affine permutation of the cluster indices
        std::mt19937_64 rng(seed);
        l.permute_add = rng() % l.cluster_count;
        do l.permute_mul = rng() % l.cluster_count | 1; while (std::gcd(l.permute_mul, l.cluster_count) != 1);
    }

    // CUDA_EMULATION_WORKERS teams run clusters at once: as many OS threads at work, since one
    // member of a team runs at a time. Each team member keeps a fiber (two memory mappings) per
    // thread of its block: at most 16384 fibers in all stays well below Linux's default limit
    // of 65530 mappings per process.
    unsigned hardware = std::max(1u, std::thread::hardware_concurrency());
    const char* configured = std::getenv("CUDA_EMULATION_WORKERS");
    std::uint64_t wanted = configured ? std::strtoull(configured, nullptr, 10) : std::min(2u, hardware);
    const std::uint64_t fibers_per_team = std::uint64_t(l.cluster_size) * threads;
    wanted = std::min({wanted, l.cluster_count, std::max<std::uint64_t>(1, 16384 / fibers_per_team)});
    const std::size_t team_count = std::size_t(std::max<std::uint64_t>(1, wanted));
    const std::size_t count = team_count * l.cluster_size;
    while (g_workers.size() < count) g_workers.push_back(std::make_unique<Worker>());
    std::vector<std::unique_ptr<Team>> teams;
    for (std::size_t i = 0; i < team_count; ++i) {
        teams.push_back(std::make_unique<Team>());
        teams.back()->launch = &l;
        for (unsigned r = 0; r < l.cluster_size; ++r)
            teams.back()->members.push_back(g_workers[i * l.cluster_size + r].get());
    }

    install_signal_handlers(true);
    std::mutex done_mutex;
    std::condition_variable done;
    std::size_t running = count;
    std::vector<std::thread> threads_;
    for (std::size_t i = 0; i < count; ++i)
        threads_.emplace_back([&, i] {
            g_workers[i]->run(l, *teams[i / l.cluster_size], int(i % l.cluster_size));
            std::lock_guard<std::mutex> lock(done_mutex);
            if (--running == 0) done.notify_all();
        });
    {
        // Watchdog: past the deadline, end every team's turns (members waiting for theirs leave)
        // and interrupt the workers until they give up their blocks.
        std::unique_lock<std::mutex> lock(done_mutex);
        auto finished = [&] { return running == 0; };
        if (timeout_seconds <= 0) done.wait(lock, finished);
        else if (!done.wait_for(lock, std::chrono::duration<double>(timeout_seconds), finished)) {
            l.timed_out = true;
            l.stop = true;
            for (auto& team : teams) {
                std::lock_guard<std::mutex> team_lock(team->mutex);
                team->finish();
            }
            while (!done.wait_for(lock, std::chrono::milliseconds(20), finished))
                for (std::thread& t : threads_) pthread_kill(t.native_handle(), timeout_signal());
        }
    }
    for (std::thread& t : threads_) t.join();
    install_signal_handlers(false);

    if (!l.failed && l.clusters_done < l.cluster_count) {  // (teams ended by the watchdog between turns)
        char what[256];
        std::snprintf(what, sizeof what, "kernel %s block (?,?,?) thread (?,?,?): %s", kernel.name.c_str(),
                      l.timed_out ? "timed out" : "did not finish (an emulator error)");
        l.failed = true;
        l.message = what;
    }
    if (!l.failed) return 0;
    message = l.message;
    pc = l.fault_pc;
    return 1;
}

}  // namespace cuda_emu

using cuda_emu::kernels;

static const cuda_emu::Kernel& kernel_at(int i) { return kernels()[std::size_t(i)]; }

CUDA_EMU_EXPORT int cuda_emu_kernel_count() { return int(kernels().size()); }
CUDA_EMU_EXPORT const char* cuda_emu_kernel_name(int i) { return kernel_at(i).name.c_str(); }
CUDA_EMU_EXPORT const char* cuda_emu_kernel_signature(int i) { return kernel_at(i).signature.c_str(); }
CUDA_EMU_EXPORT const char* cuda_emu_kernel_access(int i) { return kernel_at(i).access.c_str(); }
CUDA_EMU_EXPORT const char* cuda_emu_kernel_param_names(int i) { return kernel_at(i).param_names.c_str(); }
CUDA_EMU_EXPORT int cuda_emu_kernel_max_threads(int i) { return kernel_at(i).max_threads; }
// Fills dims with the kernel's __cluster_dims__ ((1,1,1) without); returns whether it has them.
CUDA_EMU_EXPORT int cuda_emu_kernel_cluster_dims(int i, unsigned* dims) {
    const unsigned* c = kernel_at(i).cluster;
    for (int d = 0; d < 3; ++d) dims[d] = c[0] ? c[d] : 1;
    return c[0] != 0;
}

// Returns 0 on success, 1 for a fault in the kernel, 2 for an invalid launch; `message` gets the
// text and `pc_offset` the faulting code address relative to this module (0 if none).
CUDA_EMU_EXPORT int cuda_emu_launch(int kernel, const unsigned* grid, const unsigned* block,
                                    const std::uint64_t* args, std::uint64_t shared_bytes, int order,
                                    std::uint64_t seed, double timeout_seconds, char* message,
                                    int message_size, std::uint64_t* pc_offset) {
    std::string text;
    std::uintptr_t pc = 0;
    int rc;
    try {
        rc = cuda_emu::launch_kernel(kernel, grid, block, args, shared_bytes, order, seed,
                                     timeout_seconds, text, pc);
    } catch (const std::exception& e) {
        rc = 2;
        text = std::string("launch failed: ") + e.what();
    }
    std::snprintf(message, std::size_t(message_size), "%s", text.c_str());
    Dl_info at_pc{}, here{};  // the offset only means something for code in this module
    *pc_offset = 0;
    if (pc && dladdr(reinterpret_cast<void*>(pc), &at_pc) &&
        dladdr(reinterpret_cast<void*>(&cuda_emu_launch), &here) && at_pc.dli_fbase == here.dli_fbase)
        *pc_offset = pc - reinterpret_cast<std::uintptr_t>(here.dli_fbase);
    return rc;
}

// For the sanitize build's worker process: allocate `size` bytes placed at `phase` bytes past a
// 64-byte boundary (so addresses keep their alignment from the parent process) and ending exactly
// at the allocation's end, where ASan's redzone starts. The head padding is poisoned too.
CUDA_EMU_EXPORT void* cuda_emu_alloc(std::size_t size, std::size_t phase) {
    void* base = nullptr;
    if (posix_memalign(&base, 64, phase + std::max<std::size_t>(size, 1)) != 0) return nullptr;
#ifdef __SANITIZE_ADDRESS__
    ASAN_POISON_MEMORY_REGION(base, phase + (size == 0));  // (an empty array: nothing addressable)
#endif
    return static_cast<char*>(base) + phase;
}
CUDA_EMU_EXPORT void cuda_emu_free(void* pointer, std::size_t phase) {
#ifdef __SANITIZE_ADDRESS__
    ASAN_UNPOISON_MEMORY_REGION(static_cast<char*>(pointer) - phase, phase + 1);
#endif
    std::free(static_cast<char*>(pointer) - phase);
}

CUDA_EMU_EXPORT int cuda_emu_is_sanitized() {
#ifdef __SANITIZE_ADDRESS__
    return 1;
#else
    return 0;
#endif
}

// Frees every fiber stack of this module's workers (two memory mappings each); the next launch
// makes them again.  Only between launches (the Python side calls it so that the modules of one
// process keep few fibers at a time: Linux allows 65530 mappings per process).
CUDA_EMU_EXPORT void cuda_emu_release_workers() { cuda_emu::g_workers.clear(); }

CUDA_EMU_EXPORT void cuda_emu_set_asan_report_path(const char* path) {
#ifdef __SANITIZE_ADDRESS__
    std::snprintf(cuda_emu::g_asan_report_path, sizeof cuda_emu::g_asan_report_path, "%s", path);
    __asan_set_error_report_callback(cuda_emu::on_asan_report);
#else
    (void)path;
#endif
}
