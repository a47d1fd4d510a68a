// standin.cpp -- a CUDA driver (libcuda.so.1) for machines without a GPU, for the tests.
//
// pycuda is built against this library and loads it as its driver, so the library's real GPU
// path (PycudaDevice: contexts, module loading, pycuda's argument packing, memory pools, streams)
// runs on a CPU.  Kernels run in the CPU emulation of tests/cuda_emulation: a cubin compiled by
// nvcc is registered with the emulated module.so built from the same .cu sources, and every
// cuLaunchKernel of one of its functions runs the emulated kernel, synchronously, in the calling
// thread.
//
// WHAT IT MODELS (what a GPU would get wrong for a careless caller):
//  * cuInit, devices (CUDA_STANDIN_DEVICES, default 2, compute capability 9.0), primary and
//    created contexts, a context stack per thread; memory, modules and functions belong to a
//    context, and using them in another one is an error.
//  * Device memory: every allocation gets fresh pages that are never reused at the same address,
//    filled with 0xFF bytes (NaN in every float format), followed by an unreadable guard page;
//    freed memory is made unreadable.  A count of live allocations per device.
//  * Launches: the packed argument buffer (pycuda's `extra` launch) or kernelParams is unpacked by
//    the kernel's C++ parameter types; a buffer of the wrong size is refused.  Every pointer
//    argument must point into a live allocation of the launching context.  A kernel
//    fault (a barrier not reached by every thread, a segfault, ...) fails the launch with
//    CUDA_ERROR_LAUNCH_FAILED, and cuGetErrorString names the kernel, block and thread.
//  * Thread block clusters of kernels with __cluster_dims__ (the emulation runs them): a grid
//    that is not a multiple of the cluster is refused with CUDA_ERROR_INVALID_CLUSTER_SIZE, and
//    cuFuncGetAttribute gives the CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_* dimensions;
//    CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH is 1.  Cluster sizes given at launch (cuLaunchKernelEx)
//    are not modelled.
//  * Shared memory: a kernel's static shared memory is read from the cubin (the size of its
//    .nv.shared.<kernel> section, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES).  A launch asking for more
//    dynamic shared memory than 48 KiB less that is refused unless
//    cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) raised the function's
//    limit; static plus dynamic stay within an H100's 227 KiB opt-in (the device attributes'), as
//    on a GPU.
//  * Streams (legacy default, per-thread default, blocking and non-blocking streams), events and
//    the ordering they imply, as vector clocks.  An operation on one stream that touches memory
//    last written (or, for a write, last read) by another stream with nothing ordering the two
//    (an event wait, a host synchronisation, the legacy stream's implicit barrier) is recorded
//    as a stream hazard; the tests read them with standin_hazards().  Pointer arguments of a
//    kernel count as reads when the parameter points to const, as writes otherwise; a whole
//    allocation is one unit.
//  * Stream capture: cuStreamBeginCapture / cuStreamIsCapturing / cuStreamEndCapture; launching
//    into a capture is refused (graphs are not modelled).
//  * fork(): in a child of a process that had called cuInit every call fails with
//    CUDA_ERROR_NOT_INITIALIZED, as the real driver does.
//
//  * Page-locked host memory (cuMemHostAlloc, cuMemAllocHost, cuMemFreeHost): ordinary memory,
//    remembered as page-locked, because it decides whether an "asynchronous" copy to the host makes
//    the host wait: cuMemcpyDtoHAsync into pageable memory returns only once the copy has finished
//    (CUDA's "API synchronization behavior"), so it is logged as a host wait; into page-locked
//    memory it is not.  cuEventQuery answers CUDA_SUCCESS (every operation here has completed) and
//    the host learns what the event covers, without a wait.
//
// WHAT IT DOES NOT MODEL: asynchrony (every operation completes before its call returns, so a
// missing synchronisation shows as a hazard report, never as a wrong value), timing, memory
// capacity, peer access, graphs, textures, mapped or registered host memory, JIT (PTX) loading.  Every driver
// function pycuda imports exists (the unmodelled ones in stubs.cpp, generated from cuda.h, return
// CUDA_ERROR_NOT_SUPPORTED and are listed by standin_unsupported_calls()).  One host clock
// serves all threads (a synchronisation in one host thread counts for all).
// The driver functions are the library's interface: exported, whatever -fvisibility says.
#pragma GCC visibility push(default)
#include <cuda.h>
#pragma GCC visibility pop

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#define STANDIN_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// =============================================================================================
// State.  One recursive mutex guards everything: entry points are short, and a launch runs its
// kernel to completion while holding it (kernels never call back into the driver).
// =============================================================================================
std::recursive_mutex g_mutex;
using Lock = std::lock_guard<std::recursive_mutex>;

struct Clock {  // per stream id, how many of that stream's operations are known to have finished
    std::map<int, std::uint64_t> seen;
    std::uint64_t get(int stream) const {
        auto it = seen.find(stream);
        return it == seen.end() ? 0 : it->second;
    }
    void join(const Clock& other) {
        for (const auto& [stream, count] : other.seen) seen[stream] = std::max(seen[stream], count);
    }
};

struct Context;

struct Stream {
    int id;
    Context* ctx;
    bool legacy = false, per_thread = false, non_blocking = false, capturing = false;
    Clock clock;  // what this stream's next operation is ordered after (its own count included)
    std::string name() const;
};

struct Context {
    int device;
    bool primary;
    bool alive = true;
    int retains = 0;  // primary contexts: cuDevicePrimaryCtxRetain minus releases
    Stream* legacy = nullptr;
    std::vector<Stream*> streams;  // every stream of the context (legacy and per-thread included)
};

struct Event {
    Context* ctx;
    bool recorded = false;
    Clock clock;
};

struct Access {
    int stream = -1;
    std::uint64_t seq = 0;
    std::string what;
};

struct Allocation {
    CUdeviceptr base;
    std::size_t size;
    char* mapping;  // pages [mapping, mapping + mapped) with the guard page last
    std::size_t mapped;
    Context* ctx;
    bool freed = false;
    std::uint64_t id;
    Access write;                        // last write
    std::map<int, Access> reads;         // reads since the last write, per stream
};

struct Library {  // one emulated module.so
    void* handle;
    int (*count)();
    const char* (*name)(int);
    const char* (*signature)(int);
    const char* (*access)(int);
    const char* (*param_names)(int);
    int (*max_threads)(int);
    int (*cluster_dims)(int, unsigned*);
    int (*launch)(int, const unsigned*, const unsigned*, const std::uint64_t*, std::uint64_t, int,
                  std::uint64_t, double, char*, int, std::uint64_t*);
};

struct Module;
constexpr int kSharedPerBlockOptin = 232448;  // an H100's, as the emulation's dynamic shared memory

struct Function {
    Module* module;
    int index;
    std::string name, signature, access;
    std::vector<std::string> param_names;
    int max_threads;
    unsigned cluster[3];  // __cluster_dims__, all 0 without
    int static_shared = 0;  // CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, from the cubin
    int max_dynamic_shared = 48 << 10;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: 48 KiB - static by default
};

struct Module {
    Context* ctx;
    Library* library;
    bool loaded = true;
    std::map<std::string, int> static_shared;  // kernel name -> bytes of static shared memory
    std::map<std::string, std::unique_ptr<Function>> functions;
};

int g_device_count = 0;
bool g_initialised = false;
bool g_forked = false;  // in a child forked after cuInit
int g_next_stream_id = 0;
std::uint64_t g_next_allocation_id = 0;
int g_launch_order = 0;
bool g_run_kernels = true;   // false: launches are checked and logged but their kernels not run (host time)
std::uint64_t g_launch_seed = 0;

std::vector<std::unique_ptr<Context>> g_contexts;
std::map<int, Context*> g_primary;  // device -> its primary context
std::set<Stream*> g_streams;
std::set<Event*> g_events;
std::set<Module*> g_modules;
std::set<Function*> g_functions;
std::map<CUdeviceptr, std::unique_ptr<Allocation>> g_allocations;  // by base, freed ones kept
std::map<const char*, std::size_t> g_page_locked;                   // host base -> bytes (cuMemHostAlloc)
std::map<std::uint64_t, std::string> g_cubins;                      // cubin content hash -> module.so
std::map<std::string, std::unique_ptr<Library>> g_libraries;        // module.so path -> library
Clock g_host;  // what the host has seen complete (synchronisations)
std::vector<std::string> g_hazards, g_launch_log;
// Every driver call that made the host wait for device work (a synchronisation, or a synchronous
// copy), by name: the tests hold the library to "no host synchronisation on the training path".
std::vector<std::string> g_host_wait_log;
std::vector<const char*> g_call_log;   // every driver function entered since the last clear, in order
std::set<std::string> g_unsupported;
std::string g_report;  // storage for strings returned to Python

thread_local std::vector<Context*> t_stack;  // this thread's context stack, top last
thread_local std::map<Context*, Stream*> t_per_thread;
thread_local std::string t_message;  // detail of this thread's last error
thread_local CUresult t_message_code = CUDA_SUCCESS;

std::string Stream::name() const {
    std::string device = " of device " + std::to_string(ctx->device);
    if (legacy) return "the legacy default stream" + device;
    if (per_thread) return "a per-thread default stream" + device;
    return "stream #" + std::to_string(id) + (non_blocking ? " (non-blocking)" : "") + device;
}

CUresult fail(CUresult code, const std::string& message) {
    t_message = message;
    t_message_code = code;
    return code;
}

std::string hex(std::uint64_t value) {
    char text[32];
    std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(value));
    return text;
}

// Every entry point starts with this: the driver is initialised and this is not a forked child.
#define STANDIN_ENTER()                                                                              \
    Lock lock_(g_mutex);                                                                             \
    g_call_log.push_back(__func__);                                                                  \
    if (g_forked)                                                                                    \
        return fail(CUDA_ERROR_NOT_INITIALIZED,                                                      \
                    "CUDA cannot be used in a process forked after the parent initialised it");     \
    if (!g_initialised) return fail(CUDA_ERROR_NOT_INITIALIZED, "cuInit has not been called")

Context* current() { return t_stack.empty() ? nullptr : t_stack.back(); }

#define STANDIN_NEED_CONTEXT(ctx)                                                                    \
    Context* ctx = current();                                                                        \
    if (!ctx) return fail(CUDA_ERROR_INVALID_CONTEXT, "no context is current in this thread");      \
    if (!ctx->alive) return fail(CUDA_ERROR_CONTEXT_IS_DESTROYED, "the current context was destroyed")

Stream* new_stream(Context* ctx) {
    auto* stream = new Stream{g_next_stream_id++, ctx};
    ctx->streams.push_back(stream);
    g_streams.insert(stream);
    return stream;
}

Context* new_context(int device, bool primary) {
    g_contexts.push_back(std::make_unique<Context>(Context{device, primary}));
    Context* ctx = g_contexts.back().get();
    ctx->legacy = new_stream(ctx);
    ctx->legacy->legacy = true;
    return ctx;
}

// The stream a handle names, in the current context: 0 and CU_STREAM_LEGACY are the legacy
// default stream, CU_STREAM_PER_THREAD this thread's default stream.
CUresult resolve(CUstream handle, Context* ctx, Stream** out) {
    if (handle == nullptr || handle == CU_STREAM_LEGACY) {
        *out = ctx->legacy;
    } else if (handle == CU_STREAM_PER_THREAD) {
        Stream*& stream = t_per_thread[ctx];
        if (!stream) {
            stream = new_stream(ctx);
            stream->per_thread = true;
        }
        *out = stream;
    } else {
        auto* stream = reinterpret_cast<Stream*>(handle);
        if (!g_streams.count(stream)) return fail(CUDA_ERROR_INVALID_HANDLE, "not a stream: " + hex(std::uint64_t(handle)));
        if (stream->ctx != ctx)
            return fail(CUDA_ERROR_INVALID_HANDLE, stream->name() + " belongs to another context than the current one (device " +
                                                       std::to_string(ctx->device) + ")");
        *out = stream;
    }
    return CUDA_SUCCESS;
}

// =============================================================================================
// Ordering.  An operation issued on a stream is ordered after everything the host has seen
// finish, and (for the legacy stream and the blocking streams) after the implicit barrier
// between the legacy stream and every blocking stream of its context.
// =============================================================================================
std::uint64_t begin_operation(Stream* stream) {
    stream->clock.join(g_host);
    if (stream->legacy) {
        for (Stream* other : stream->ctx->streams)
            if (!other->non_blocking && other != stream) stream->clock.join(other->clock);
    } else if (!stream->non_blocking) {
        stream->clock.join(stream->ctx->legacy->clock);
    }
    return ++stream->clock.seen[stream->id];
}

Stream* stream_by_id(int id) {
    for (Stream* stream : g_streams)
        if (stream->id == id) return stream;
    return nullptr;
}

std::string stream_name(int id) {
    Stream* stream = stream_by_id(id);
    return stream ? stream->name() : "stream #" + std::to_string(id) + " (destroyed)";
}

void touch(Stream* stream, std::uint64_t seq, Allocation* allocation, bool write, const std::string& what) {
    auto unordered = [&](const Access& earlier) {
        return earlier.stream >= 0 && earlier.stream != stream->id && stream->clock.get(earlier.stream) < earlier.seq;
    };
    auto report = [&](const Access& earlier, const char* earlier_verb) {
        g_hazards.push_back("stream hazard: " + what + " on " + stream->name() + (write ? " writes" : " reads") +
                            " device memory " + hex(allocation->base) + " (" + std::to_string(allocation->size) +
                            " bytes) " + earlier_verb + " by " + earlier.what + " on " + stream_name(earlier.stream) +
                            ", with no synchronisation between the two streams");
    };
    if (unordered(allocation->write)) report(allocation->write, "last written");
    if (write) {
        for (const auto& [id, read] : allocation->reads)
            if (unordered(read)) report(read, "read");
        allocation->write = Access{stream->id, seq, what};
        allocation->reads.clear();
    } else {
        allocation->reads[stream->id] = Access{stream->id, seq, what};
    }
}

void host_waits_for(const Clock& clock, const char* why) {
    g_host.join(clock);
    g_host_wait_log.push_back(why);
}

// =============================================================================================
// Memory
// =============================================================================================
std::size_t page_size() { return std::size_t(sysconf(_SC_PAGESIZE)); }

// The allocation holding [address, address + bytes), live or freed; null when there is none.
Allocation* find_allocation(CUdeviceptr address, std::size_t bytes = 0) {
    auto it = g_allocations.upper_bound(address);
    if (it == g_allocations.begin()) return nullptr;
    Allocation* allocation = std::prev(it)->second.get();
    if (address + bytes > allocation->base + allocation->size) return nullptr;
    if (bytes == 0 && address > allocation->base + allocation->size) return nullptr;
    return allocation;
}

CUresult device_range(CUdeviceptr address, std::size_t bytes, const std::string& what, Allocation** out) {
    Allocation* allocation = find_allocation(address, bytes);
    if (!allocation)
        return fail(CUDA_ERROR_INVALID_VALUE, what + ": [" + hex(address) + ", +" + std::to_string(bytes) +
                                                  ") is not inside one device allocation");
    if (allocation->freed)
        return fail(CUDA_ERROR_INVALID_VALUE, what + ": " + hex(address) + " points into freed device memory");
    *out = allocation;
    return CUDA_SUCCESS;
}

// =============================================================================================
// Modules: a cubin is recognised by the hash of its bytes and runs as the module.so registered
// for it.
// =============================================================================================
std::uint64_t fnv1a(const void* data, std::size_t size) {
    std::uint64_t hash = 1469598103934665603ull;
    for (std::size_t i = 0; i < size; ++i) hash = (hash ^ static_cast<const unsigned char*>(data)[i]) * 1099511628211ull;
    return hash;
}

// Size of an ELF image in memory (cuModuleLoadData gets no size): the end of its section table.
std::size_t elf_size(const void* image) {
    const auto* bytes = static_cast<const unsigned char*>(image);
    if (std::memcmp(bytes, "\x7f" "ELF", 4) != 0 || bytes[4] != 2) return 0;  // 64-bit ELF only
    std::uint64_t shoff;
    std::uint16_t shentsize, shnum;
    std::memcpy(&shoff, bytes + 0x28, 8);
    std::memcpy(&shentsize, bytes + 0x3A, 2);
    std::memcpy(&shnum, bytes + 0x3C, 2);
    return std::size_t(shoff + std::uint64_t(shentsize) * shnum);
}

// Each kernel's static shared memory in a cubin: the size of its section .nv.shared.<kernel>
// (NOBITS, so the size is all there is), named through the section-name string table.
std::map<std::string, int> static_shared_sizes(const void* image) {
    const auto* bytes = static_cast<const unsigned char*>(image);
    std::uint64_t shoff;
    std::uint16_t shentsize, shnum, shstrndx;
    std::memcpy(&shoff, bytes + 0x28, 8);
    std::memcpy(&shentsize, bytes + 0x3A, 2);
    std::memcpy(&shnum, bytes + 0x3C, 2);
    std::memcpy(&shstrndx, bytes + 0x3E, 2);
    auto field = [&](unsigned section, unsigned offset) {
        std::uint64_t value;
        std::memcpy(&value, bytes + shoff + std::uint64_t(section) * shentsize + offset, 8);
        return value;
    };
    const char* names = reinterpret_cast<const char*>(bytes + field(shstrndx, 0x18));   // sh_offset
    const std::string prefix = ".nv.shared.";
    std::map<std::string, int> sizes;
    for (unsigned i = 0; i < shnum; ++i) {
        std::uint32_t name;
        std::memcpy(&name, bytes + shoff + std::uint64_t(i) * shentsize, 4);   // sh_name
        std::string section = names + name;
        if (section.compare(0, prefix.size(), prefix) == 0) sizes[section.substr(prefix.size())] = int(field(i, 0x20));   // sh_size
    }
    return sizes;
}

Library* open_library(const std::string& path, std::string& error) {
    auto found = g_libraries.find(path);
    if (found != g_libraries.end()) return found->second.get();
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        error = dlerror();
        return nullptr;
    }
    auto library = std::make_unique<Library>();
    library->handle = handle;
    bool ok = true;
    auto bind = [&](auto& slot, const char* symbol) {
        slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(dlsym(handle, symbol));
        if (!slot) ok = false;
    };
    bind(library->count, "cuda_emu_kernel_count");
    bind(library->name, "cuda_emu_kernel_name");
    bind(library->signature, "cuda_emu_kernel_signature");
    bind(library->access, "cuda_emu_kernel_access");
    bind(library->param_names, "cuda_emu_kernel_param_names");
    bind(library->max_threads, "cuda_emu_kernel_max_threads");
    bind(library->cluster_dims, "cuda_emu_kernel_cluster_dims");
    bind(library->launch, "cuda_emu_launch");
    if (!ok) {
        error = path + " is not a module of tests/cuda_emulation";
        return nullptr;
    }
    return (g_libraries[path] = std::move(library)).get();
}

CUresult load_image(CUmodule* out, const void* image, std::size_t size) {
    STANDIN_NEED_CONTEXT(ctx);
    if (!out || !image || size == 0) return fail(CUDA_ERROR_INVALID_IMAGE, "not a cubin (only ELF cubins are modelled)");
    auto found = g_cubins.find(fnv1a(image, size));
    if (found == g_cubins.end())
        return fail(CUDA_ERROR_INVALID_IMAGE, "no emulated module is registered for this cubin "
                                              "(tests: driver_standin.register_cubin)");
    std::string error;
    Library* library = open_library(found->second, error);
    if (!library) return fail(CUDA_ERROR_INVALID_IMAGE, error);
    auto* module = new Module{ctx, library};
    module->static_shared = static_shared_sizes(image);
    g_modules.insert(module);
    *out = reinterpret_cast<CUmodule>(module);
    return CUDA_SUCCESS;
}

CUresult check_module(CUmodule handle, Module** out) {
    auto* module = reinterpret_cast<Module*>(handle);
    if (!g_modules.count(module)) return fail(CUDA_ERROR_INVALID_HANDLE, "not a module");
    if (!module->loaded) return fail(CUDA_ERROR_INVALID_HANDLE, "the module was unloaded");
    *out = module;
    return CUDA_SUCCESS;
}

// =============================================================================================
// Launch arguments: native alignment, as a C struct of the parameters (and pycuda's
// struct.pack with the kernel's format) lays them out, with no trailing padding.
// =============================================================================================
std::size_t parameter_size(char code) {
    switch (code) {
        case 'P': case 'q': case 'Q': case 'd': return 8;
        case 'i': case 'I': case 'f': return 4;
        case 'h': case 'H': case 'e': return 2;
        case 'b': case 'B': case '?': return 1;
        default: return 0;
    }
}

std::string parameter_label(const Function& f, std::size_t i) {
    std::string label = "parameter " + std::to_string(i);
    if (i < f.param_names.size() && !f.param_names[i].empty()) label += " (" + f.param_names[i] + ")";
    return label;
}

CUresult unpack_arguments(const Function& f, void** kernel_params, void** extra, std::vector<std::uint64_t>& slots) {
    const std::string& signature = f.signature;
    std::vector<std::size_t> offsets;
    std::size_t end = 0;
    for (std::size_t i = 0; i < signature.size(); ++i) {
        std::size_t size = parameter_size(signature[i]);
        if (size == 0) return fail(CUDA_ERROR_INVALID_VALUE, f.name + ": " + parameter_label(f, i) + " has a type the stand-in cannot pass");
        std::size_t offset = (end + size - 1) / size * size;
        offsets.push_back(offset);
        end = offset + size;
    }
    if ((kernel_params == nullptr) == (extra == nullptr))
        return fail(CUDA_ERROR_INVALID_VALUE, f.name + ": pass exactly one of kernelParams and extra");
    slots.assign(signature.size(), 0);
    if (kernel_params) {
        for (std::size_t i = 0; i < signature.size(); ++i)
            std::memcpy(&slots[i], kernel_params[i], parameter_size(signature[i]));
        return CUDA_SUCCESS;
    }
    const char* buffer = nullptr;
    const std::size_t* buffer_size = nullptr;
    for (void** option = extra; *option != nullptr && *option != CU_LAUNCH_PARAM_END; option += 2) {
        if (option[0] == CU_LAUNCH_PARAM_BUFFER_POINTER) buffer = static_cast<const char*>(option[1]);
        else if (option[0] == CU_LAUNCH_PARAM_BUFFER_SIZE) buffer_size = static_cast<const std::size_t*>(option[1]);
        else return fail(CUDA_ERROR_INVALID_VALUE, f.name + ": unknown option in extra");
    }
    if (!buffer || !buffer_size)
        return fail(CUDA_ERROR_INVALID_VALUE, f.name + ": extra needs CU_LAUNCH_PARAM_BUFFER_POINTER and _SIZE");
    if (*buffer_size != end)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    f.name + " takes parameters \"" + signature + "\", " + std::to_string(end) +
                        " bytes packed with native alignment; the launch passes " + std::to_string(*buffer_size) +
                        " bytes (a wrong prepare() format?)");
    for (std::size_t i = 0; i < signature.size(); ++i)
        std::memcpy(&slots[i], buffer + offsets[i], parameter_size(signature[i]));
    return CUDA_SUCCESS;
}

void record_unsupported(const char* name) {
    Lock lock(g_mutex);
    g_unsupported.insert(name);
}

}  // namespace

// =============================================================================================
// Unmodelled entry points (stubs.cpp) report here.
// =============================================================================================
STANDIN_EXPORT int standin_unsupported(const char* name) {
    record_unsupported(name);
    return fail(CUDA_ERROR_NOT_SUPPORTED, std::string(name) + " is not modelled by the driver stand-in");
}

// =============================================================================================
// Initialisation, version, errors
// =============================================================================================
CUresult CUDAAPI cuInit(unsigned int flags) {
    Lock lock(g_mutex);
    if (g_forked) return fail(CUDA_ERROR_NOT_INITIALIZED, "CUDA cannot be used in a process forked after the parent initialised it");
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0");
    if (!g_initialised) {
        const char* count = std::getenv("CUDA_STANDIN_DEVICES");
        g_device_count = count ? std::max(0, std::atoi(count)) : 2;
        g_initialised = true;
    }
    return g_device_count ? CUDA_SUCCESS : fail(CUDA_ERROR_NO_DEVICE, "CUDA_STANDIN_DEVICES=0");
}

CUresult CUDAAPI cuDriverGetVersion(int* version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = CUDA_VERSION;
    return CUDA_SUCCESS;
}

namespace {
struct ErrorText {
    const char* name;
    const char* description;
};

const ErrorText* error_text(CUresult error) {
#define STANDIN_ERROR(code, description) {code, {#code, description}}
    static const std::map<int, ErrorText> texts = {
        STANDIN_ERROR(CUDA_SUCCESS, "no error"),
        STANDIN_ERROR(CUDA_ERROR_INVALID_VALUE, "invalid argument"),
        STANDIN_ERROR(CUDA_ERROR_OUT_OF_MEMORY, "out of memory"),
        STANDIN_ERROR(CUDA_ERROR_NOT_INITIALIZED, "initialization error"),
        STANDIN_ERROR(CUDA_ERROR_NO_DEVICE, "no CUDA-capable device is detected"),
        STANDIN_ERROR(CUDA_ERROR_INVALID_DEVICE, "invalid device ordinal"),
        STANDIN_ERROR(CUDA_ERROR_INVALID_IMAGE, "device kernel image is invalid"),
        STANDIN_ERROR(CUDA_ERROR_INVALID_CONTEXT, "invalid device context"),
        STANDIN_ERROR(CUDA_ERROR_CONTEXT_IS_DESTROYED, "context is destroyed"),
        STANDIN_ERROR(CUDA_ERROR_FILE_NOT_FOUND, "file not found"),
        STANDIN_ERROR(CUDA_ERROR_INVALID_HANDLE, "invalid resource handle"),
        STANDIN_ERROR(CUDA_ERROR_NOT_FOUND, "named symbol not found"),
        STANDIN_ERROR(CUDA_ERROR_LAUNCH_FAILED, "unspecified launch failure"),
        STANDIN_ERROR(CUDA_ERROR_ILLEGAL_ADDRESS, "an illegal memory access was encountered"),
        STANDIN_ERROR(CUDA_ERROR_NOT_SUPPORTED, "operation not supported"),
        STANDIN_ERROR(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "operation not permitted when stream is capturing"),
        STANDIN_ERROR(CUDA_ERROR_ILLEGAL_STATE, "the operation cannot be performed in the present state"),
        STANDIN_ERROR(CUDA_ERROR_INVALID_CLUSTER_SIZE, "invalid cluster size"),
    };
#undef STANDIN_ERROR
    auto found = texts.find(error);
    return found == texts.end() ? nullptr : &found->second;
}
}  // namespace

CUresult CUDAAPI cuGetErrorName(CUresult error, const char** text) {
    const ErrorText* known = error_text(error);
    if (!text || !known) return CUDA_ERROR_INVALID_VALUE;
    *text = known->name;
    return CUDA_SUCCESS;
}

// The standard description, followed by the detail of this thread's last error of that code:
// pycuda puts this string in its exception, so a kernel fault names its block and thread there.
CUresult CUDAAPI cuGetErrorString(CUresult error, const char** text) {
    const ErrorText* known = error_text(error);
    if (!text || !known) return CUDA_ERROR_INVALID_VALUE;
    static thread_local std::string composed;
    composed = known->description;
    if (error == t_message_code && !t_message.empty()) composed += " [driver stand-in: " + t_message + "]";
    *text = composed.c_str();
    return CUDA_SUCCESS;
}

// =============================================================================================
// Devices
// =============================================================================================
#define STANDIN_NEED_DEVICE(dev)                                                                     \
    if ((dev) < 0 || (dev) >= g_device_count)                                                        \
    return fail(CUDA_ERROR_INVALID_DEVICE, "no device " + std::to_string(dev))

CUresult CUDAAPI cuDeviceGetCount(int* count) {
    STANDIN_ENTER();
    *count = g_device_count;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGet(CUdevice* device, int ordinal) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(ordinal);
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetName(char* name, int length, CUdevice dev) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    std::snprintf(name, std::size_t(length), "CUDA driver stand-in device %d (CPU emulation)", dev);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceTotalMem(std::size_t* bytes, CUdevice dev) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    *bytes = std::size_t(16) << 30;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceComputeCapability(int* major, int* minor, CUdevice dev) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    *major = 9;
    *minor = 0;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice dev) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    switch (attribute) {
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *value = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *value = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *value = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *value = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *value = 49152; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = kSharedPerBlockOptin; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *value = 233472; break;
        case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: *value = 65536; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *value = 65536; break;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *value = 1000000; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = 4; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *value = 50 << 20; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *value = 2048; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *value = 1; break;
        case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: *value = dev; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: *value = 1; break;
        case CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH: *value = 1; break;
        default: *value = 0;
    }
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetPCIBusId(char* text, int length, CUdevice dev) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    std::snprintf(text, std::size_t(length), "0000:%02x:00.0", dev);
    return CUDA_SUCCESS;
}

// =============================================================================================
// Contexts
// =============================================================================================
CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext* out, CUdevice dev) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    Context*& ctx = g_primary[dev];
    if (!ctx) ctx = new_context(dev, true);
    ++ctx->retains;
    *out = reinterpret_cast<CUcontext>(ctx);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice dev) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    Context* ctx = g_primary[dev];
    if (!ctx || ctx->retains == 0) return fail(CUDA_ERROR_INVALID_CONTEXT, "the primary context was not retained");
    --ctx->retains;  // (its resources stay: the stand-in never resets a primary context)
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int* flags, int* active) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    *flags = 0;
    *active = g_primary[dev] && g_primary[dev]->retains > 0;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxSetFlags(CUdevice dev, unsigned int) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxCreate(CUcontext* out, CUctxCreateParams*, unsigned int, CUdevice dev) {
    STANDIN_ENTER();
    STANDIN_NEED_DEVICE(dev);
    Context* ctx = new_context(dev, false);
    t_stack.push_back(ctx);
    *out = reinterpret_cast<CUcontext>(ctx);
    return CUDA_SUCCESS;
}

static CUresult check_context(CUcontext handle, Context** out) {
    auto* ctx = reinterpret_cast<Context*>(handle);
    for (const auto& owned : g_contexts)
        if (owned.get() == ctx) {
            if (!ctx->alive) return fail(CUDA_ERROR_CONTEXT_IS_DESTROYED, "the context was destroyed");
            *out = ctx;
            return CUDA_SUCCESS;
        }
    return fail(CUDA_ERROR_INVALID_CONTEXT, "not a context: " + hex(std::uint64_t(handle)));
}

CUresult CUDAAPI cuCtxDestroy(CUcontext handle) {
    STANDIN_ENTER();
    Context* ctx;
    if (CUresult rc = check_context(handle, &ctx)) return rc;
    if (ctx->primary) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxDestroy of a primary context");
    ctx->alive = false;
    t_stack.erase(std::remove(t_stack.begin(), t_stack.end(), ctx), t_stack.end());
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxDetach(CUcontext handle) { return cuCtxDestroy(handle); }

CUresult CUDAAPI cuCtxPushCurrent(CUcontext handle) {
    STANDIN_ENTER();
    Context* ctx;
    if (CUresult rc = check_context(handle, &ctx)) return rc;
    t_stack.push_back(ctx);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxPopCurrent(CUcontext* out) {
    STANDIN_ENTER();
    if (t_stack.empty()) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxPopCurrent: no context is current in this thread");
    if (out) *out = reinterpret_cast<CUcontext>(t_stack.back());
    t_stack.pop_back();
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext* out) {
    STANDIN_ENTER();
    *out = reinterpret_cast<CUcontext>(current());
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetCurrent(CUcontext handle) {
    STANDIN_ENTER();
    if (!t_stack.empty()) t_stack.pop_back();
    if (handle == nullptr) return CUDA_SUCCESS;
    Context* ctx;
    if (CUresult rc = check_context(handle, &ctx)) return rc;
    t_stack.push_back(ctx);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetDevice(CUdevice* device) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    *device = ctx->device;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetApiVersion(CUcontext, unsigned int* version) {
    STANDIN_ENTER();
    *version = 3020;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSynchronize() {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    for (Stream* stream : ctx->streams) host_waits_for(stream->clock, "cuCtxSynchronize");
    return CUDA_SUCCESS;
}

// =============================================================================================
// Memory
// =============================================================================================
CUresult CUDAAPI cuMemAlloc(CUdeviceptr* out, std::size_t bytes) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    if (bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc of 0 bytes");
    // The allocation ends 256-byte aligned right before a guard page: a read past its end (beyond
    // the rounding of its size to 256 bytes, as a GPU's allocation granularity allows) faults.
    std::size_t rounded = (bytes + 255) / 256 * 256;
    std::size_t pages = (rounded + page_size() - 1) / page_size();
    std::size_t mapped = (pages + 1) * page_size();
    void* mapping = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) return fail(CUDA_ERROR_OUT_OF_MEMORY, "mmap failed");
    char* guard = static_cast<char*>(mapping) + pages * page_size();
    mprotect(guard, page_size(), PROT_NONE);
    char* base = guard - rounded;
    std::memset(base, 0xFF, rounded);
    auto allocation = std::make_unique<Allocation>(
        Allocation{CUdeviceptr(base), bytes, static_cast<char*>(mapping), mapped, ctx, false, ++g_next_allocation_id});
    *out = allocation->base;
    g_allocations[allocation->base] = std::move(allocation);
    return CUDA_SUCCESS;
}

namespace {
// Whether [p, p + n) lies in one page-locked allocation.
bool page_locked(const void* p, std::size_t n) {
    const char* c = static_cast<const char*>(p);
    auto it = g_page_locked.upper_bound(c);
    if (it == g_page_locked.begin()) return false;
    --it;
    return c >= it->first && c + n <= it->first + it->second;
}
}  // namespace

CUresult CUDAAPI cuMemHostAlloc(void** out, std::size_t bytes, unsigned int) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    if (bytes == 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemHostAlloc of 0 bytes");
    char* base = static_cast<char*>(std::calloc(bytes, 1));
    if (!base) return fail(CUDA_ERROR_OUT_OF_MEMORY, "cuMemHostAlloc: calloc failed");
    g_page_locked[base] = bytes;
    *out = base;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemAllocHost(void** out, std::size_t bytes) { return cuMemHostAlloc(out, bytes, 0); }

CUresult CUDAAPI cuMemFreeHost(void* p) {
    STANDIN_ENTER();
    auto it = g_page_locked.find(static_cast<const char*>(p));
    if (it == g_page_locked.end()) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFreeHost: not memory of cuMemHostAlloc");
    g_page_locked.erase(it);
    std::free(p);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemFree(CUdeviceptr address) {
    STANDIN_ENTER();
    auto it = g_allocations.find(address);
    if (it == g_allocations.end()) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFree: " + hex(address) + " is not the start of an allocation");
    Allocation* allocation = it->second.get();
    if (allocation->freed) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemFree: " + hex(address) + " was already freed");
    // Freed memory stays reserved (the address is never handed out again) but unreadable.
    madvise(allocation->mapping, allocation->mapped, MADV_DONTNEED);
    mprotect(allocation->mapping, allocation->mapped, PROT_NONE);
    allocation->freed = true;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetInfo(std::size_t* free_bytes, std::size_t* total) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    std::size_t used = 0;
    for (const auto& [base, allocation] : g_allocations)
        if (!allocation->freed && allocation->ctx->device == ctx->device) used += allocation->size;
    *total = std::size_t(16) << 30;
    *free_bytes = *total - std::min(used, *total);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemGetAddressRange(CUdeviceptr* base, std::size_t* size, CUdeviceptr address) {
    STANDIN_ENTER();
    Allocation* allocation;
    if (CUresult rc = device_range(address, 0, "cuMemGetAddressRange", &allocation)) return rc;
    if (base) *base = allocation->base;
    if (size) *size = allocation->size;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuPointerGetAttribute(void* data, CUpointer_attribute attribute, CUdeviceptr address) {
    STANDIN_ENTER();
    Allocation* allocation;
    if (CUresult rc = device_range(address, 0, "cuPointerGetAttribute", &allocation)) return rc;
    switch (attribute) {
        case CU_POINTER_ATTRIBUTE_CONTEXT: *static_cast<CUcontext*>(data) = reinterpret_cast<CUcontext>(allocation->ctx); break;
        case CU_POINTER_ATTRIBUTE_MEMORY_TYPE: *static_cast<unsigned*>(data) = CU_MEMORYTYPE_DEVICE; break;
        case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: {
            // For the current context.  A context of the same device reaches every context's memory
            // of that device (the answer an H200 with driver 580 gave at a0916b1, for the memory of
            // a context made by make_context asked from the primary one); another device's, none.
            STANDIN_NEED_CONTEXT(ctx);
            if (allocation->ctx->device != ctx->device)
                return fail(CUDA_ERROR_INVALID_VALUE, "cuPointerGetAttribute: " + hex(address) +
                                                          " is memory of another device, which has no address here");
            *static_cast<CUdeviceptr*>(data) = address;
            break;
        }
        case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *static_cast<int*>(data) = allocation->ctx->device; break;
        case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: *static_cast<CUdeviceptr*>(data) = allocation->base; break;
        case CU_POINTER_ATTRIBUTE_RANGE_SIZE: *static_cast<std::size_t*>(data) = allocation->size; break;
        case CU_POINTER_ATTRIBUTE_BUFFER_ID: *static_cast<unsigned long long*>(data) = allocation->id; break;
        case CU_POINTER_ATTRIBUTE_IS_MANAGED: *static_cast<unsigned*>(data) = 0; break;
        default: return fail(CUDA_ERROR_NOT_SUPPORTED, "cuPointerGetAttribute: attribute not modelled");
    }
    return CUDA_SUCCESS;
}

namespace {
// A copy or memset as a stream operation: check the device ranges, order it, record the accesses,
// do it.  `host_sync`: the call returns only when it has finished (the synchronous DtoH copies).
CUresult copy(const char* what, CUdeviceptr dst_device, void* dst_host, CUdeviceptr src_device, const void* src_host,
              std::size_t bytes, CUstream handle, bool host_sync) {
    STANDIN_NEED_CONTEXT(ctx);
    Stream* stream;
    if (CUresult rc = resolve(handle, ctx, &stream)) return rc;
    if (stream->capturing) return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, std::string(what) + " into a stream capture is not modelled");
    Allocation *dst = nullptr, *src = nullptr;
    if (dst_device)
        if (CUresult rc = device_range(dst_device, bytes, std::string(what) + " destination", &dst)) return rc;
    if (src_device)
        if (CUresult rc = device_range(src_device, bytes, std::string(what) + " source", &src)) return rc;
    std::uint64_t seq = begin_operation(stream);
    if (src) touch(stream, seq, src, false, what);
    if (dst) touch(stream, seq, dst, true, what);
    void* to = dst ? reinterpret_cast<void*>(dst_device) : dst_host;
    const void* from = src ? reinterpret_cast<const void*>(src_device) : src_host;
    if (bytes) std::memmove(to, from, bytes);
    if (host_sync) host_waits_for(stream->clock, what);
    return CUDA_SUCCESS;
}

CUresult fill(const char* what, CUdeviceptr address, std::uint32_t value, std::size_t element, std::size_t count, CUstream handle) {
    STANDIN_NEED_CONTEXT(ctx);
    Stream* stream;
    if (CUresult rc = resolve(handle, ctx, &stream)) return rc;
    if (stream->capturing) return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, std::string(what) + " into a stream capture is not modelled");
    Allocation* allocation;
    if (CUresult rc = device_range(address, element * count, what, &allocation)) return rc;
    touch(stream, begin_operation(stream), allocation, true, what);
    char* to = reinterpret_cast<char*>(address);
    for (std::size_t i = 0; i < count; ++i) std::memcpy(to + i * element, &value, element);
    return CUDA_SUCCESS;
}
}  // namespace

#define STANDIN_COPY(...) STANDIN_ENTER(); return copy(__VA_ARGS__)
// (cuMemcpyHtoD from pageable memory synchronises the legacy stream, and with it the blocking
// streams, before it copies: the host waits, as for the synchronous DtoH copy.)
CUresult CUDAAPI cuMemcpyHtoD(CUdeviceptr dst, const void* src, std::size_t n) { STANDIN_COPY("cuMemcpyHtoD", dst, nullptr, 0, src, n, nullptr, true); }
CUresult CUDAAPI cuMemcpyDtoH(void* dst, CUdeviceptr src, std::size_t n) { STANDIN_COPY("cuMemcpyDtoH", 0, dst, src, nullptr, n, nullptr, true); }
CUresult CUDAAPI cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, std::size_t n) { STANDIN_COPY("cuMemcpyDtoD", dst, nullptr, src, nullptr, n, nullptr, false); }
CUresult CUDAAPI cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, std::size_t n, CUstream s) { STANDIN_COPY("cuMemcpyHtoDAsync", dst, nullptr, 0, src, n, s, false); }
CUresult CUDAAPI cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, std::size_t n, CUstream s) {
    STANDIN_COPY("cuMemcpyDtoHAsync", 0, dst, src, nullptr, n, s, !page_locked(dst, n));   // (pageable: a wait)
}
CUresult CUDAAPI cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, std::size_t n, CUstream s) { STANDIN_COPY("cuMemcpyDtoDAsync", dst, nullptr, src, nullptr, n, s, false); }
CUresult CUDAAPI cuMemsetD8(CUdeviceptr dst, unsigned char v, std::size_t n) { STANDIN_ENTER(); return fill("cuMemsetD8", dst, v, 1, n, nullptr); }
CUresult CUDAAPI cuMemsetD16(CUdeviceptr dst, unsigned short v, std::size_t n) { STANDIN_ENTER(); return fill("cuMemsetD16", dst, v, 2, n, nullptr); }
CUresult CUDAAPI cuMemsetD32(CUdeviceptr dst, unsigned int v, std::size_t n) { STANDIN_ENTER(); return fill("cuMemsetD32", dst, v, 4, n, nullptr); }
CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr dst, unsigned char v, std::size_t n, CUstream s) { STANDIN_ENTER(); return fill("cuMemsetD8Async", dst, v, 1, n, s); }
CUresult CUDAAPI cuMemsetD16Async(CUdeviceptr dst, unsigned short v, std::size_t n, CUstream s) { STANDIN_ENTER(); return fill("cuMemsetD16Async", dst, v, 2, n, s); }
CUresult CUDAAPI cuMemsetD32Async(CUdeviceptr dst, unsigned int v, std::size_t n, CUstream s) { STANDIN_ENTER(); return fill("cuMemsetD32Async", dst, v, 4, n, s); }

// =============================================================================================
// Streams and events
// =============================================================================================
CUresult CUDAAPI cuStreamCreate(CUstream* out, unsigned int flags) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    if (flags & ~unsigned(CU_STREAM_NON_BLOCKING)) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamCreate: unknown flags");
    Stream* stream = new_stream(ctx);
    stream->non_blocking = flags & CU_STREAM_NON_BLOCKING;
    // A new stream starts after everything the host has already seen complete.
    stream->clock.join(g_host);
    *out = reinterpret_cast<CUstream>(stream);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamCreateWithPriority(CUstream* out, unsigned int flags, int) { return cuStreamCreate(out, flags); }

CUresult CUDAAPI cuStreamDestroy(CUstream handle) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    Stream* stream;
    if (CUresult rc = resolve(handle, ctx, &stream)) return rc;
    if (stream->legacy || stream->per_thread) return fail(CUDA_ERROR_INVALID_HANDLE, "cannot destroy a default stream");
    // Its pending work still completes: what it did stays in the clocks of those that waited.
    g_streams.erase(stream);
    ctx->streams.erase(std::remove(ctx->streams.begin(), ctx->streams.end(), stream), ctx->streams.end());
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamGetFlags(CUstream handle, unsigned int* flags) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    Stream* stream;
    if (CUresult rc = resolve(handle, ctx, &stream)) return rc;
    *flags = stream->non_blocking ? CU_STREAM_NON_BLOCKING : 0;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamSynchronize(CUstream handle) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    Stream* stream;
    if (CUresult rc = resolve(handle, ctx, &stream)) return rc;
    host_waits_for(stream->clock, "cuStreamSynchronize");
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamQuery(CUstream handle) { return cuStreamSynchronize(handle); }  // always done

CUresult CUDAAPI cuEventCreate(CUevent* out, unsigned int) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    auto* event = new Event{ctx};
    g_events.insert(event);
    *out = reinterpret_cast<CUevent>(event);
    return CUDA_SUCCESS;
}

static CUresult check_event(CUevent handle, Event** out) {
    auto* event = reinterpret_cast<Event*>(handle);
    if (!g_events.count(event)) return fail(CUDA_ERROR_INVALID_HANDLE, "not an event: " + hex(std::uint64_t(handle)));
    *out = event;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventDestroy(CUevent handle) {
    STANDIN_ENTER();
    Event* event;
    if (CUresult rc = check_event(handle, &event)) return rc;
    g_events.erase(event);
    delete event;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventRecord(CUevent handle, CUstream stream_handle) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    Event* event;
    if (CUresult rc = check_event(handle, &event)) return rc;
    Stream* stream;
    if (CUresult rc = resolve(stream_handle, ctx, &stream)) return rc;
    if (event->ctx != ctx) return fail(CUDA_ERROR_INVALID_HANDLE, "the event belongs to another context");
    begin_operation(stream);  // a record is an operation of the stream, ordered like any other
    event->clock = stream->clock;
    event->recorded = true;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventRecordWithFlags(CUevent handle, CUstream stream, unsigned int) { return cuEventRecord(handle, stream); }

CUresult CUDAAPI cuEventSynchronize(CUevent handle) {
    STANDIN_ENTER();
    Event* event;
    if (CUresult rc = check_event(handle, &event)) return rc;
    host_waits_for(event->clock, "cuEventSynchronize");
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventQuery(CUevent handle) {   // (always done here; the host learns so, without waiting)
    STANDIN_ENTER();
    Event* event;
    if (CUresult rc = check_event(handle, &event)) return rc;
    g_host.join(event->clock);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    STANDIN_ENTER();
    Event *a, *b;
    if (CUresult rc = check_event(start, &a)) return rc;
    if (CUresult rc = check_event(end, &b)) return rc;
    *ms = 0.0f;  // no timing is modelled
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamWaitEvent(CUstream stream_handle, CUevent handle, unsigned int) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    Event* event;
    if (CUresult rc = check_event(handle, &event)) return rc;
    Stream* stream;
    if (CUresult rc = resolve(stream_handle, ctx, &stream)) return rc;
    stream->clock.join(event->clock);  // an event never recorded is complete: nothing to join
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamBeginCapture(CUstream handle, CUstreamCaptureMode) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    Stream* stream;
    if (CUresult rc = resolve(handle, ctx, &stream)) return rc;
    if (stream->legacy) return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "the legacy stream cannot be captured");
    if (stream->capturing) return fail(CUDA_ERROR_ILLEGAL_STATE, "the stream is already capturing");
    stream->capturing = true;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamEndCapture(CUstream handle, CUgraph* graph) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    Stream* stream;
    if (CUresult rc = resolve(handle, ctx, &stream)) return rc;
    if (!stream->capturing) return fail(CUDA_ERROR_ILLEGAL_STATE, "the stream is not capturing");
    stream->capturing = false;
    *graph = nullptr;  // graphs are not modelled: nothing was captured
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamIsCapturing(CUstream handle, CUstreamCaptureStatus* status) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    Stream* stream;
    if (CUresult rc = resolve(handle, ctx, &stream)) return rc;
    *status = stream->capturing ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}

// =============================================================================================
// Modules, functions, launches
// =============================================================================================
CUresult CUDAAPI cuModuleLoad(CUmodule* out, const char* path) {
    STANDIN_ENTER();
    std::ifstream file(path, std::ios::binary);
    if (!file) return fail(CUDA_ERROR_FILE_NOT_FOUND, std::string("cannot read ") + path);
    std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    return load_image(out, bytes.data(), bytes.size());
}

CUresult CUDAAPI cuModuleLoadData(CUmodule* out, const void* image) {
    STANDIN_ENTER();
    return load_image(out, image, image ? elf_size(image) : 0);
}

CUresult CUDAAPI cuModuleLoadDataEx(CUmodule* out, const void* image, unsigned int, CUjit_option*, void**) {
    return cuModuleLoadData(out, image);
}

CUresult CUDAAPI cuModuleUnload(CUmodule handle) {
    STANDIN_ENTER();
    Module* module;
    if (CUresult rc = check_module(handle, &module)) return rc;
    module->loaded = false;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleGetFunction(CUfunction* out, CUmodule handle, const char* name) {
    STANDIN_ENTER();
    Module* module;
    if (CUresult rc = check_module(handle, &module)) return rc;
    auto cached = module->functions.find(name);
    if (cached == module->functions.end()) {
        Library* library = module->library;
        int index = -1;
        for (int i = 0; i < library->count(); ++i)
            if (std::strcmp(library->name(i), name) == 0) index = i;
        if (index < 0) return fail(CUDA_ERROR_NOT_FOUND, std::string("no kernel named ") + name + " in the module");
        auto function = std::make_unique<Function>(Function{module, index, name, library->signature(index),
                                                            library->access(index), {}, library->max_threads(index),
                                                            {0, 0, 0}});
        if (library->cluster_dims(index, function->cluster) == 0) std::fill_n(function->cluster, 3, 0u);
        auto static_shared = module->static_shared.find(name);
        function->static_shared = static_shared == module->static_shared.end() ? 0 : static_shared->second;
        function->max_dynamic_shared = (48 << 10) - function->static_shared;
        std::stringstream names(library->param_names(index));
        for (std::string item; std::getline(names, item, ',');) function->param_names.push_back(item);
        g_functions.insert(function.get());
        cached = module->functions.emplace(name, std::move(function)).first;
    }
    *out = reinterpret_cast<CUfunction>(cached->second.get());
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncGetAttribute(int* value, CUfunction_attribute attribute, CUfunction handle) {
    STANDIN_ENTER();
    auto* function = reinterpret_cast<Function*>(handle);
    if (!g_functions.count(function)) return fail(CUDA_ERROR_INVALID_HANDLE, "not a function");
    switch (attribute) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = function->max_threads ? function->max_threads : 1024; break;
        case CU_FUNC_ATTRIBUTE_NUM_REGS: *value = 32; break;
        case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *value = function->static_shared; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *value = function->max_dynamic_shared; break;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION: case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *value = 90; break;
        case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH: *value = int(function->cluster[0]); break;
        case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT: *value = int(function->cluster[1]); break;
        case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_DEPTH: *value = int(function->cluster[2]); break;
        default: *value = 0;
    }
    return CUDA_SUCCESS;
}

// Only the dynamic shared memory limit is modelled: a launch asking for more than 48 KiB less the
// kernel's static shared memory fails unless it was raised (static plus dynamic up to the
// device's opt-in maximum), as on a GPU.
CUresult CUDAAPI cuFuncSetAttribute(CUfunction handle, CUfunction_attribute attribute, int value) {
    STANDIN_ENTER();
    auto* function = reinterpret_cast<Function*>(handle);
    if (!g_functions.count(function)) return fail(CUDA_ERROR_INVALID_HANDLE, "not a function");
    if (attribute != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "cuFuncSetAttribute: only MAX_DYNAMIC_SHARED_SIZE_BYTES is modelled");
    if (value < 0 || value + function->static_shared > kSharedPerBlockOptin)
        return fail(CUDA_ERROR_INVALID_VALUE, function->name + ": " + std::to_string(value) +
                                                  " bytes of dynamic shared memory and its " +
                                                  std::to_string(function->static_shared) +
                                                  " static ones are past the device's " +
                                                  std::to_string(kSharedPerBlockOptin));
    function->max_dynamic_shared = value;
    return CUDA_SUCCESS;
}

// pycuda's prepared calls set the block shape the old way before every cuLaunchKernel, which
// carries the shape that counts.
CUresult CUDAAPI cuFuncSetBlockShape(CUfunction handle, int, int, int) {
    STANDIN_ENTER();
    if (!g_functions.count(reinterpret_cast<Function*>(handle))) return fail(CUDA_ERROR_INVALID_HANDLE, "not a function");
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuLaunchKernel(CUfunction handle, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                                unsigned int by, unsigned int bz, unsigned int shared_bytes, CUstream stream_handle,
                                void** kernel_params, void** extra) {
    STANDIN_ENTER();
    STANDIN_NEED_CONTEXT(ctx);
    auto* function = reinterpret_cast<Function*>(handle);
    if (!g_functions.count(function)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: not a function");
    Module* module = function->module;
    if (!module->loaded) return fail(CUDA_ERROR_INVALID_HANDLE, function->name + ": its module was unloaded");
    if (module->ctx != ctx)
        return fail(CUDA_ERROR_INVALID_HANDLE, function->name + " belongs to a module loaded in a context of device " +
                                                   std::to_string(module->ctx->device) + ", launched in a context of device " +
                                                   std::to_string(ctx->device));
    Stream* stream;
    if (CUresult rc = resolve(stream_handle, ctx, &stream)) return rc;
    if (stream->capturing)
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, function->name + ": launches into a stream capture are not modelled");
    const unsigned* cluster = function->cluster;
    if (cluster[0] && (gx % cluster[0] || gy % cluster[1] || gz % cluster[2]))
        return fail(CUDA_ERROR_INVALID_CLUSTER_SIZE, function->name + ": grid (" + std::to_string(gx) + "," +
                                                         std::to_string(gy) + "," + std::to_string(gz) +
                                                         ") is not a multiple of its __cluster_dims__(" +
                                                         std::to_string(cluster[0]) + "," + std::to_string(cluster[1]) +
                                                         "," + std::to_string(cluster[2]) + ")");
    if (int(shared_bytes) > function->max_dynamic_shared)
        return fail(CUDA_ERROR_INVALID_VALUE, function->name + ": " + std::to_string(shared_bytes) +
                                                  " bytes of dynamic shared memory, past its limit of " +
                                                  std::to_string(function->max_dynamic_shared) + " (it has " +
                                                  std::to_string(function->static_shared) +
                                                  " static ones; cuFuncSetAttribute raises the limit)");
    std::vector<std::uint64_t> slots;
    if (CUresult rc = unpack_arguments(*function, kernel_params, extra, slots)) return rc;

    // Every pointer argument points into a live allocation of this context's device.
    std::vector<std::pair<Allocation*, bool>> touched;  // (allocation, written)
    for (std::size_t i = 0; i < slots.size(); ++i) {
        if (function->signature[i] != 'P' || slots[i] == 0) continue;
        std::string where = function->name + " " + parameter_label(*function, i) + " = " + hex(slots[i]);
        Allocation* allocation = find_allocation(slots[i]);
        if (!allocation) return fail(CUDA_ERROR_INVALID_VALUE, where + " is not device memory");
        if (allocation->freed) return fail(CUDA_ERROR_INVALID_VALUE, where + " points into freed device memory");
        if (allocation->ctx->device != ctx->device)
            return fail(CUDA_ERROR_INVALID_VALUE, where + " is memory of device " + std::to_string(allocation->ctx->device) +
                                                      ", but the launch is in a context of device " + std::to_string(ctx->device));
        // (memory of another context of the same device is reachable: see DEVICE_POINTER)
        touched.emplace_back(allocation, function->access[i] == 'w');
    }
    std::uint64_t seq = begin_operation(stream);
    for (const auto& [allocation, written] : touched) touch(stream, seq, allocation, written, "kernel " + function->name);
    g_launch_log.push_back(function->name + " device=" + std::to_string(ctx->device) + " stream=" +
                           (stream->legacy ? std::string("legacy") : std::to_string(stream->id)));

    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    char message[8192];
    std::uint64_t pc = 0;
    const char* timeout = std::getenv("CUDA_EMULATION_TIMEOUT");
    if (!g_run_kernels) return CUDA_SUCCESS;
    int rc = module->library->launch(function->index, grid, block, slots.data(), shared_bytes, g_launch_order,
                                     g_launch_seed, timeout ? std::atof(timeout) : 60.0, message, sizeof message, &pc);
    if (rc == 1) return fail(CUDA_ERROR_LAUNCH_FAILED, message);
    if (rc == 2) return fail(CUDA_ERROR_INVALID_VALUE, std::string("invalid launch of ") + function->name + ": " + message);
    return CUDA_SUCCESS;
}

// =============================================================================================
// The tests' side: register cubins, read what happened.
// =============================================================================================
// Run the kernels of `cubin_path` (its exact bytes) as the emulated module `module_path`.
STANDIN_EXPORT int standin_register_cubin(const char* cubin_path, const char* module_path) {
    Lock lock(g_mutex);
    std::ifstream file(cubin_path, std::ios::binary);
    if (!file) return -1;
    std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    g_cubins[fnv1a(bytes.data(), bytes.size())] = module_path;
    return 0;
}

// One report for the tests: the lines of `lines`, each ended by a newline, in g_report.
template <typename Lines> const char* report_lines(const Lines& lines) {
    Lock lock(g_mutex);
    g_report.clear();
    for (const auto& line : lines) g_report += std::string(line) + "\n";
    return g_report.c_str();
}

STANDIN_EXPORT const char* standin_hazards() { return report_lines(g_hazards); }
STANDIN_EXPORT const char* standin_launches() { return report_lines(g_launch_log); }
STANDIN_EXPORT const char* standin_unsupported_calls() { return report_lines(g_unsupported); }
STANDIN_EXPORT const char* standin_host_waits() { return report_lines(g_host_wait_log); }
STANDIN_EXPORT const char* standin_driver_calls() { return report_lines(g_call_log); }

STANDIN_EXPORT void standin_clear_log() {
    Lock lock(g_mutex);
    g_hazards.clear();
    g_launch_log.clear();
    g_host_wait_log.clear();
    g_call_log.clear();
}

// Live allocations of a device (-1: of all devices).
STANDIN_EXPORT long standin_live_allocations(int device) {
    Lock lock(g_mutex);
    long count = 0;
    for (const auto& [base, allocation] : g_allocations)
        count += !allocation->freed && (device < 0 || allocation->ctx->device == device);
    return count;
}

// The order in which emulated blocks and threads run (0 forward, 1 reverse, 2 random with seed).
STANDIN_EXPORT void standin_set_launch_order(int order, unsigned long long seed) {
    Lock lock(g_mutex);
    g_launch_order = order;
    g_launch_seed = seed;
}

// Whether launches run their kernels (1) or are only checked and logged (0: a measurement of the
// host's time a call, benchmarks/host_time.py).
STANDIN_EXPORT void standin_set_run_kernels(int run) {
    Lock lock(g_mutex);
    g_run_kernels = run != 0;
}

// After fork() in a process that had initialised CUDA, the child's driver refuses every call.
namespace {
void before_fork() { g_mutex.lock(); }
void after_fork_parent() { g_mutex.unlock(); }
void after_fork_child() {
    g_forked = g_initialised;
    // The lock belongs to the parent's thread id, which the child's thread no longer has: a fresh one.
    new (&g_mutex) std::recursive_mutex();
}
const int g_atfork = pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}  // namespace
