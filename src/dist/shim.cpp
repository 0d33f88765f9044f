// Thin C ABI over PyTorch's c10d (TCPStore, PrefixStore, ProcessGroupGloo and, with SF_NCCL,
// ProcessGroupNCCL) for the Rust wrapper in src/dist/ffi.rs.
//
// Rules every function here follows:
//  * No C++ exception ever crosses into Rust: c10d reports everything (timeouts, dead peers,
//    bad arguments) by throwing, so each entry point catches and returns the message instead.
//  * Return value 0 = success; non-zero = failure with `*err` set to a malloc'd, NUL-terminated
//    message the caller frees with sf_free.
//  * Handles are heap objects holding intrusive_ptrs; the caller frees each exactly once.
//  * A tch tensor handle (torch-sys `C_tensor*`) is a pointer to a heap `at::Tensor` (libtch's
//    torch_api.h: `typedef torch::Tensor *tensor;`). Collectives take shallow copies of those
//    tensors, which share storage, so the operations write in place into the caller's tensors.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <chrono>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/autocast_mode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef SF_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

// ---------------------------------------------------------------------------------------------
// Layout guards. The shim allocates these objects itself (make_intrusive / by-value options) and
// hands them to constructors compiled into libtorch, so our idea of their size and field offsets
// must equal the library's. The values were read from libtorch_cpu.so 2.11.0 machine code
// (operator new sizes and constructor stores, see docs/distributed.md "Layout guards"); a torch
// or header upgrade that moves them fails the build here instead of corrupting memory at run time.
// offsetof on these non-standard-layout classes is conditionally supported; GCC and Clang give
// the ABI offset, which is what we compare.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winvalid-offsetof"
static_assert(sizeof(c10d::ProcessGroupGloo) == 0x1e8,
              "ProcessGroupGloo size differs from libtorch 2.11.0");
static_assert(sizeof(c10d::ProcessGroupGloo::Options) == 0xb0,
              "ProcessGroupGloo::Options size differs from libtorch 2.11.0");
static_assert(offsetof(c10d::ProcessGroupGloo::Options, threads) == 0xa8,
              "ProcessGroupGloo::Options::threads offset differs from libtorch 2.11.0");
static_assert(offsetof(c10d::ProcessGroupGloo::Options, devices) == 0x90,
              "ProcessGroupGloo::Options::devices offset differs from libtorch 2.11.0");
static_assert(offsetof(c10d::Backend::Options, timeout) == 0x10,
              "Backend::Options::timeout offset differs from libtorch 2.11.0");
static_assert(sizeof(c10d::TCPStoreOptions) == 0x38,
              "TCPStoreOptions size differs from libtorch 2.11.0");
static_assert(offsetof(c10d::TCPStoreOptions, timeout) == 0x20,
              "TCPStoreOptions::timeout offset differs from libtorch 2.11.0");
static_assert(offsetof(c10d::TCPStoreOptions, useLibUV) == 0x34,
              "TCPStoreOptions::useLibUV offset differs from libtorch 2.11.0");
#ifdef SF_NCCL
// ProcessGroupNCCL::Options embeds ncclConfig_t, whose size follows nccl.h's version macros:
// these values hold for the nccl.h of nvidia-nccl-cu13 2.28.9, the NCCL torch 2.11.0 pins.
static_assert(sizeof(c10d::ProcessGroupNCCL) == 0x458,
              "ProcessGroupNCCL size differs from libtorch_cuda 2.11.0");
static_assert(sizeof(c10d::ProcessGroupNCCL::Options) == 0xf8,
              "ProcessGroupNCCL::Options size differs from libtorch_cuda 2.11.0 "
              "(compile against the nccl.h of nvidia-nccl-cu13 2.28.9)");
static_assert(offsetof(c10d::ProcessGroupNCCL::Options, is_high_priority_stream) == 0x90,
              "ProcessGroupNCCL::Options::is_high_priority_stream offset differs from libtorch_cuda 2.11.0");
static_assert(offsetof(c10d::ProcessGroupNCCL::Options, split_color) == 0xf0,
              "ProcessGroupNCCL::Options::split_color offset differs from libtorch_cuda 2.11.0 "
              "(compile against the nccl.h of nvidia-nccl-cu13 2.28.9)");
#endif
#pragma GCC diagnostic pop

namespace {

char* dup_message(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p != nullptr) {
    std::memcpy(p, s.c_str(), s.size() + 1);
  }
  return p;
}

// Runs `f`, turning any exception into a message. c10::Error::what() carries a C++ backtrace
// that would bury the cause in our error strings, so the backtrace-free form is used.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    if (err != nullptr) *err = dup_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    if (err != nullptr) *err = dup_message(e.what());
  } catch (...) {
    if (err != nullptr) *err = dup_message("unknown C++ exception");
  }
  return 1;
}

std::chrono::milliseconds ms(int64_t v) { return std::chrono::milliseconds(v); }

}  // namespace

struct sf_store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct sf_pg {
  c10::intrusive_ptr<c10d::Backend> backend;
  bool is_nccl;
};

struct sf_work {
  c10::intrusive_ptr<c10d::Work> work;
};

extern "C" {

void sf_free(void* p) { std::free(p); }

// ---- autocast ---------------------------------------------------------------------------------

// The dtype CUDA autocast casts to on this thread. tch's `autocast` only switches autocast on,
// which then uses libtorch's default, float16 (with no loss scaling); training means bfloat16.
int sf_autocast_cuda_bf16(int bf16, int* now_bf16, char** err) {
  return guarded(err, [&] {
    at::autocast::set_autocast_dtype(at::kCUDA, bf16 != 0 ? at::kBFloat16 : at::kHalf);
    *now_bf16 = at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16 ? 1 : 0;
  });
}

// ---- stores ---------------------------------------------------------------------------------

// A TCPStore at host:port. is_server: this process hosts it, on the already bound and listening
// socket `listen_fd` (taken over: c10d closes it) so that it listens only where the caller bound;
// listen_fd < 0 lets c10d bind every interface on `port`. wait_workers > 0: every process (server and clients alike) counts
// itself in, and the server's constructor waits until that many joined (itself included). timeout_ms bounds connecting, joining
// and every later blocking get/wait.
int sf_store_tcp(const char* host, uint16_t port, int is_server, int wait_workers,
                 int64_t timeout_ms, int listen_fd, sf_store** out, char** err) {
  return guarded(err, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    if (is_server != 0 && listen_fd >= 0) {
      opts.masterListenFd = listen_fd;
    }
    if (wait_workers > 0) {
      opts.numWorkers = static_cast<std::size_t>(wait_workers);
      opts.waitWorkers = true;
    } else {
      opts.numWorkers = std::nullopt;
      opts.waitWorkers = false;
    }
    opts.timeout = ms(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new sf_store{store};
  });
}

// A view of `s` whose keys all start with `prefix` (c10d::PrefixStore adds "prefix/").
int sf_store_prefix(sf_store* s, const char* prefix, sf_store** out, char** err) {
  return guarded(err, [&] {
    auto p = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s->store);
    *out = new sf_store{p};
  });
}

// A second client connection to the same store (for a thread of its own: a blocked call on one
// connection then cannot delay calls on the other).
int sf_store_clone(sf_store* s, sf_store** out, char** err) {
  return guarded(err, [&] { *out = new sf_store{s->store->clone()}; });
}

int sf_store_set_timeout(sf_store* s, int64_t timeout_ms, char** err) {
  return guarded(err, [&] { s->store->setTimeout(ms(timeout_ms)); });
}

int sf_store_set(sf_store* s, const char* key, const uint8_t* data, size_t len, char** err) {
  return guarded(err, [&] {
    std::vector<uint8_t> v(data, data + len);
    s->store->set(std::string(key), v);
  });
}

// Blocks until `key` exists (up to the store's timeout), then returns its value in a malloc'd
// buffer (*data, *len); free it with sf_free.
int sf_store_get(sf_store* s, const char* key, uint8_t** data, size_t* len, char** err) {
  return guarded(err, [&] {
    std::vector<uint8_t> v = s->store->get(std::string(key));
    uint8_t* p = static_cast<uint8_t*>(std::malloc(v.empty() ? 1 : v.size()));
    TORCH_CHECK(p != nullptr, "out of memory");
    if (!v.empty()) std::memcpy(p, v.data(), v.size());
    *data = p;
    *len = v.size();
  });
}

int sf_store_add(sf_store* s, const char* key, int64_t delta, int64_t* value, char** err) {
  return guarded(err, [&] { *value = s->store->add(std::string(key), delta); });
}

// Non-blocking: whether `key` exists.
int sf_store_check(sf_store* s, const char* key, int* exists, char** err) {
  return guarded(err, [&] {
    *exists = s->store->check({std::string(key)}) ? 1 : 0;
  });
}

void sf_store_free(sf_store* s) { delete s; }

// ---- process groups -------------------------------------------------------------------------

// A Gloo group over `store`. Transport device, in order: the comma-separated interface names in
// `ifnames` (GLOO_SOCKET_IFNAME), else the address `hostname` (loopback jobs pass 127.0.0.1 so they
// never depend on this host's name resolving), else Gloo's default (this host's name, falling back
// to loopback). timeout_ms is the group's default operation timeout; every call also passes its own.
int sf_pg_gloo(sf_store* s, int rank, int size, int64_t timeout_ms, const char* ifnames,
               const char* hostname, int threads, sf_pg** out, char** err) {
  return guarded(err, [&] {
    auto opts = c10d::ProcessGroupGloo::Options::create(ms(timeout_ms));
    if (ifnames != nullptr && ifnames[0] != '\0') {
      std::string all(ifnames);
      size_t start = 0;
      while (start <= all.size()) {
        size_t end = all.find(',', start);
        if (end == std::string::npos) end = all.size();
        std::string name = all.substr(start, end - start);
        if (!name.empty()) {
          opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
        }
        start = end + 1;
      }
    } else if (hostname != nullptr && hostname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    TORCH_CHECK(!opts->devices.empty(), "no Gloo transport device");
    if (threads > 0) opts->threads = threads;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(s->store, rank, size, opts);
    *out = new sf_pg{pg, false};
  });
}

// An NCCL group over `store` for CUDA device `device` (this process's local rank). 0 = built with
// the `nccl` feature. Without it the function reports that it is unavailable.
int sf_pg_nccl(sf_store* s, int rank, int size, int64_t timeout_ms, int device, sf_pg** out,
               char** err) {
#ifdef SF_NCCL
  return guarded(err, [&] {
    // tch has no set-device API; NCCL communicators and ProcessGroupNCCL's internal streams use
    // the current device, so make it this rank's GPU before anything is created.
    // With no GPU at all, leave the check to ProcessGroupNCCL, whose message says so plainly.
    if (c10::cuda::device_count() > 0) {
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    }
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = ms(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(s->store, rank, size, opts);
    pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    *out = new sf_pg{pg, true};
  });
#else
  (void)s; (void)rank; (void)size; (void)timeout_ms; (void)device; (void)out;
  if (err != nullptr) *err = dup_message("built without the `nccl` cargo feature");
  return 1;
#endif
}

int sf_pg_is_nccl(sf_pg* pg) { return pg->is_nccl ? 1 : 0; }

// op: 0 sum, 1 avg (NCCL only; the Rust side divides a Gloo sum), 2 max, 3 min, 4 product.
static c10d::ReduceOp to_reduce_op(int op) {
  switch (op) {
    case 0: return c10d::ReduceOp(c10d::ReduceOp::SUM);
    case 1: return c10d::ReduceOp(c10d::ReduceOp::AVG);
    case 2: return c10d::ReduceOp(c10d::ReduceOp::MAX);
    case 3: return c10d::ReduceOp(c10d::ReduceOp::MIN);
    case 4: return c10d::ReduceOp(c10d::ReduceOp::PRODUCT);
    default: TORCH_CHECK(false, "unknown reduce op ", op);
  }
}

// The collectives only start the operation and return a work handle; sf_work_wait completes it.
// timeout_ms becomes the operation's own timeout inside the backend (Gloo stops waiting for a
// peer after it), so a failed operation also stops running in the backend's worker thread.
int sf_pg_allreduce(sf_pg* pg, void* tensor, int op, int64_t timeout_ms, sf_work** out,
                    char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = to_reduce_op(op);
    opts.timeout = ms(timeout_ms);
    *out = new sf_work{pg->backend->allreduce(ts, opts)};
  });
}

int sf_pg_broadcast(sf_pg* pg, void* tensor, int root, int64_t timeout_ms, sf_work** out,
                    char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    opts.timeout = ms(timeout_ms);
    *out = new sf_work{pg->backend->broadcast(ts, opts)};
  });
}

// outputs: `n` (= world size) tensors shaped like `input`; output i receives rank i's input.
int sf_pg_allgather(sf_pg* pg, void* const* outputs, size_t n, void* input, int64_t timeout_ms,
                    sf_work** out, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> in{*static_cast<at::Tensor*>(input)};
    std::vector<std::vector<at::Tensor>> outs(1);
    outs[0].reserve(n);
    for (size_t i = 0; i < n; ++i) outs[0].push_back(*static_cast<at::Tensor*>(outputs[i]));
    c10d::AllgatherOptions opts;
    opts.timeout = ms(timeout_ms);
    *out = new sf_work{pg->backend->allgather(outs, in, opts)};
  });
}

int sf_pg_barrier(sf_pg* pg, int64_t timeout_ms, sf_work** out, char** err) {
  return guarded(err, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = ms(timeout_ms);
    *out = new sf_work{pg->backend->barrier(opts)};
  });
}

// Waits at most timeout_ms for the work to finish; a timeout or the operation's own failure
// (a dead peer, a backend timeout) comes back as the error. For NCCL, passing a timeout makes
// the calling thread wait for the GPU work instead of only ordering the current stream after it.
int sf_work_wait(sf_work* w, int64_t timeout_ms, char** err) {
  return guarded(err, [&] {
    bool ok = w->work->wait(ms(timeout_ms));
    TORCH_CHECK(ok, "operation did not complete");
  });
}

void sf_work_free(sf_work* w) { delete w; }

// Tears down the group after a failure: NCCL communicators are aborted (pending GPU work would
// otherwise keep the destructor waiting). Gloo has nothing to abort: its destructor returns once
// the worker threads are out of their (timed) operations.
void sf_pg_abort(sf_pg* pg) {
  try {
    if (pg->is_nccl) pg->backend->abort();
  } catch (...) {
    // Best effort on a group that already failed; the process is about to drop it.
  }
}

// Clean shutdown of a healthy group (NCCL: waits for pending work, destroys communicators).
int sf_pg_shutdown(sf_pg* pg, char** err) {
  return guarded(err, [&] {
    if (pg->is_nccl) pg->backend->shutdown();
  });
}

void sf_pg_free(sf_pg* pg) {
  try {
    delete pg;
  } catch (...) {
    // Destructors may not throw into Rust; nothing more can be done with a broken group.
  }
}

}  // extern "C"
