//! Safe handles over the C++ shim (shim.cpp): c10d's TCPStore / PrefixStore, a backend
//! (ProcessGroupGloo or ProcessGroupNCCL) and a pending operation (c10d::Work).
//!
//! Every shim function returns 0 on success or non-zero with a malloc'd message; [`call`] turns
//! that into `Result<(), String>`. The handles free their C++ objects on drop.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

#[repr(C)]
struct SfStore {
    _private: [u8; 0],
}
#[repr(C)]
struct SfPg {
    _private: [u8; 0],
}
#[repr(C)]
struct SfWork {
    _private: [u8; 0],
}

extern "C" {
    fn sf_free(p: *mut c_void);
    fn sf_autocast_cuda_bf16(bf16: c_int, now_bf16: *mut c_int, err: *mut *mut c_char) -> c_int;
    fn sf_store_tcp(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        wait_workers: c_int,
        timeout_ms: i64,
        listen_fd: c_int,
        out: *mut *mut SfStore,
        err: *mut *mut c_char,
    ) -> c_int;
    fn sf_store_prefix(s: *mut SfStore, prefix: *const c_char, out: *mut *mut SfStore, err: *mut *mut c_char) -> c_int;
    fn sf_store_clone(s: *mut SfStore, out: *mut *mut SfStore, err: *mut *mut c_char) -> c_int;
    fn sf_store_set_timeout(s: *mut SfStore, timeout_ms: i64, err: *mut *mut c_char) -> c_int;
    fn sf_store_set(s: *mut SfStore, key: *const c_char, data: *const u8, len: usize, err: *mut *mut c_char) -> c_int;
    fn sf_store_get(s: *mut SfStore, key: *const c_char, data: *mut *mut u8, len: *mut usize, err: *mut *mut c_char) -> c_int;
    fn sf_store_add(s: *mut SfStore, key: *const c_char, delta: i64, value: *mut i64, err: *mut *mut c_char) -> c_int;
    fn sf_store_check(s: *mut SfStore, key: *const c_char, exists: *mut c_int, err: *mut *mut c_char) -> c_int;
    fn sf_store_free(s: *mut SfStore);

    fn sf_pg_gloo(
        s: *mut SfStore,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        ifnames: *const c_char,
        hostname: *const c_char,
        threads: c_int,
        out: *mut *mut SfPg,
        err: *mut *mut c_char,
    ) -> c_int;
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    fn sf_pg_nccl(
        s: *mut SfStore,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        device: c_int,
        out: *mut *mut SfPg,
        err: *mut *mut c_char,
    ) -> c_int;
    fn sf_pg_allreduce(
        pg: *mut SfPg,
        tensor: *mut c_void,
        op: c_int,
        timeout_ms: i64,
        out: *mut *mut SfWork,
        err: *mut *mut c_char,
    ) -> c_int;
    fn sf_pg_broadcast(
        pg: *mut SfPg,
        tensor: *mut c_void,
        root: c_int,
        timeout_ms: i64,
        out: *mut *mut SfWork,
        err: *mut *mut c_char,
    ) -> c_int;
    fn sf_pg_allgather(
        pg: *mut SfPg,
        outputs: *const *mut c_void,
        n: usize,
        input: *mut c_void,
        timeout_ms: i64,
        out: *mut *mut SfWork,
        err: *mut *mut c_char,
    ) -> c_int;
    fn sf_pg_barrier(pg: *mut SfPg, timeout_ms: i64, out: *mut *mut SfWork, err: *mut *mut c_char) -> c_int;
    fn sf_work_wait(w: *mut SfWork, timeout_ms: i64, err: *mut *mut c_char) -> c_int;
    fn sf_work_free(w: *mut SfWork);
    fn sf_pg_abort(pg: *mut SfPg);
    fn sf_pg_shutdown(pg: *mut SfPg, err: *mut *mut c_char) -> c_int;
    fn sf_pg_free(pg: *mut SfPg);
}

/// Milliseconds for c10d, at least 1 (0 would mean "no timeout" to some c10d paths) and clamped
/// so that a huge Duration cannot overflow into a negative (= unset) value.
/// Sets the dtype CUDA autocast computes in on this thread: bfloat16 (`true`) or libtorch's
/// float16 default; returns whether bfloat16 is now in force.
pub fn set_autocast_cuda_bf16(bf16: bool) -> Result<bool, String> {
    let mut now: c_int = 0;
    // SAFETY: `now` is a valid out-parameter for the call.
    call(|err| unsafe { sf_autocast_cuda_bf16(c_int::from(bf16), &mut now, err) })?;
    Ok(now != 0)
}

pub(crate) fn millis(d: Duration) -> i64 {
    d.as_millis().clamp(1, i64::MAX as u128 / 2) as i64
}

/// Runs a shim call that reports failure through `err`, returning its message.
fn call(f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<(), String> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let rc = f(&mut err);
    if rc == 0 {
        return Ok(());
    }
    if err.is_null() {
        return Err(format!("c10d call failed (code {rc}) without a message"));
    }
    // SAFETY: on failure the shim sets `err` to a NUL-terminated string it malloc'd (dup_message);
    // we copy it and free it exactly once with the matching allocator (sf_free = free).
    let msg = unsafe {
        let m = CStr::from_ptr(err).to_string_lossy().into_owned();
        sf_free(err.cast());
        m
    };
    Err(msg)
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("`{s}` contains a NUL byte"))
}

/// A c10d store (TCPStore, possibly seen through PrefixStores). Thread-safe: c10d's TCPStore
/// serialises the operations of one client connection with a mutex; for concurrent use from
/// several threads give each its own connection ([`RawStore::clone_connection`]).
pub(crate) struct RawStore(NonNull<SfStore>);

// SAFETY: the C++ store is heap-allocated, owned by this handle, and c10d's TCPStore/PrefixStore
// lock internally (TCPStore::activeOpLock_), so it may be used and dropped from any thread.
unsafe impl Send for RawStore {}
// SAFETY: see Send; all methods take &self and the C++ side synchronises.
unsafe impl Sync for RawStore {}

impl RawStore {
    fn from_out(out: *mut SfStore) -> Result<Self, String> {
        NonNull::new(out).map(RawStore).ok_or_else(|| "c10d returned no store".to_string())
    }

    /// A TCPStore client at `host:port` (`wait_workers` > 0: count this process in).
    pub(crate) fn tcp(host: &str, port: u16, wait_workers: usize, timeout: Duration) -> Result<Self, String> {
        Self::tcp_raw(host, port, false, wait_workers, timeout, -1)
    }

    /// A TCPStore server hosted by this process on `listener` (bound by the caller, so the store
    /// listens only on that address; c10d takes the socket over).
    pub(crate) fn tcp_server(listener: std::net::TcpListener, wait_workers: usize, timeout: Duration) -> Result<Self, String> {
        use std::os::fd::IntoRawFd;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let fd = listener.into_raw_fd();
        Self::tcp_raw(&addr.ip().to_string(), addr.port(), true, wait_workers, timeout, fd)
    }

    fn tcp_raw(host: &str, port: u16, is_server: bool, wait_workers: usize, timeout: Duration, fd: c_int) -> Result<Self, String> {
        let host = cstring(host)?;
        let wait = c_int::try_from(wait_workers).map_err(|_| "too many workers".to_string())?;
        let mut out = std::ptr::null_mut();
        // SAFETY: host is a valid C string for the call; `fd` is a listening socket we own and
        // hand over (or -1); `out` receives a new heap handle we own.
        call(|err| unsafe { sf_store_tcp(host.as_ptr(), port, c_int::from(is_server), wait, millis(timeout), fd, &mut out, err) })?;
        Self::from_out(out)
    }

    /// A view whose keys are prefixed by `prefix/`.
    pub(crate) fn prefixed(&self, prefix: &str) -> Result<Self, String> {
        let p = cstring(prefix)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: live handle, valid C string, `out` receives a new handle we own (the C++
        // PrefixStore holds its own reference to the underlying store).
        call(|err| unsafe { sf_store_prefix(self.0.as_ptr(), p.as_ptr(), &mut out, err) })?;
        Self::from_out(out)
    }

    /// A second client connection to the same store.
    pub(crate) fn clone_connection(&self) -> Result<Self, String> {
        let mut out = std::ptr::null_mut();
        // SAFETY: live handle; `out` receives a new handle we own.
        call(|err| unsafe { sf_store_clone(self.0.as_ptr(), &mut out, err) })?;
        Self::from_out(out)
    }

    /// Sets how long blocking gets wait for a key.
    pub(crate) fn set_timeout(&self, timeout: Duration) -> Result<(), String> {
        // SAFETY: live handle.
        call(|err| unsafe { sf_store_set_timeout(self.0.as_ptr(), millis(timeout), err) })
    }

    pub(crate) fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        let k = cstring(key)?;
        // SAFETY: live handle, valid C string, `value` is valid for len bytes during the call.
        call(|err| unsafe { sf_store_set(self.0.as_ptr(), k.as_ptr(), value.as_ptr(), value.len(), err) })
    }

    pub(crate) fn get(&self, key: &str) -> Result<Vec<u8>, String> {
        let k = cstring(key)?;
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: live handle, valid C string, out pointers valid.
        call(|err| unsafe { sf_store_get(self.0.as_ptr(), k.as_ptr(), &mut data, &mut len, err) })?;
        if data.is_null() {
            return Err("c10d returned no value".into());
        }
        // SAFETY: on success the shim malloc'd `data` with at least `len` bytes; we copy them and
        // free the buffer once with sf_free.
        let v = unsafe {
            let v = std::slice::from_raw_parts(data, len).to_vec();
            sf_free(data.cast());
            v
        };
        Ok(v)
    }

    pub(crate) fn add(&self, key: &str, delta: i64) -> Result<i64, String> {
        let k = cstring(key)?;
        let mut v = 0i64;
        // SAFETY: live handle, valid C string and out pointer.
        call(|err| unsafe { sf_store_add(self.0.as_ptr(), k.as_ptr(), delta, &mut v, err) })?;
        Ok(v)
    }

    pub(crate) fn check(&self, key: &str) -> Result<bool, String> {
        let k = cstring(key)?;
        let mut exists: c_int = 0;
        // SAFETY: live handle, valid C string and out pointer.
        call(|err| unsafe { sf_store_check(self.0.as_ptr(), k.as_ptr(), &mut exists, err) })?;
        Ok(exists != 0)
    }

    fn as_ptr(&self) -> *mut SfStore {
        self.0.as_ptr()
    }
}

impl Drop for RawStore {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it exactly once.
        unsafe { sf_store_free(self.0.as_ptr()) }
    }
}

/// A c10d backend: ProcessGroupGloo or ProcessGroupNCCL.
pub(crate) struct RawGroup(NonNull<SfPg>);

// SAFETY: c10d backends are designed to be called from any thread (they queue work to their own
// threads / streams under internal locks); the handle owns the C++ object.
unsafe impl Send for RawGroup {}
// SAFETY: see Send; the collective entry points lock internally.
unsafe impl Sync for RawGroup {}

/// Reduce operation codes understood by the shim.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RawOp {
    Sum = 0,
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    Avg = 1,
    Max = 2,
    Min = 3,
    Product = 4,
}

impl RawGroup {
    fn from_out(out: *mut SfPg) -> Result<Self, String> {
        NonNull::new(out).map(RawGroup).ok_or_else(|| "c10d returned no process group".to_string())
    }

    /// A Gloo group; see sf_pg_gloo for how the transport device is chosen.
    pub(crate) fn gloo(
        store: &RawStore,
        rank: usize,
        size: usize,
        timeout: Duration,
        ifnames: Option<&str>,
        hostname: Option<&str>,
        threads: usize,
    ) -> Result<Self, String> {
        let ifn = ifnames.map(cstring).transpose()?;
        let host = hostname.map(cstring).transpose()?;
        let (rank, size, threads) = ints(rank, size, threads)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: live store handle; optional C strings valid for the call (null when absent);
        // `out` receives a new handle we own (the group keeps its own reference to the store).
        call(|err| unsafe {
            sf_pg_gloo(
                store.as_ptr(),
                rank,
                size,
                millis(timeout),
                ifn.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                host.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                threads,
                &mut out,
                err,
            )
        })?;
        Self::from_out(out)
    }

    /// An NCCL group bound to CUDA device `device`.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn nccl(store: &RawStore, rank: usize, size: usize, timeout: Duration, device: usize) -> Result<Self, String> {
        let (rank, size, device) = ints(rank, size, device)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: live store handle; `out` receives a new handle we own.
        call(|err| unsafe { sf_pg_nccl(store.as_ptr(), rank, size, millis(timeout), device, &mut out, err) })?;
        Self::from_out(out)
    }

    /// Starts an in-place all-reduce of the tensor behind `tensor` (a tch `C_tensor` pointer).
    ///
    /// # Safety
    /// `tensor` must point to a live tch tensor for the duration of the call (the backend keeps
    /// its own reference to the storage afterwards).
    pub(crate) unsafe fn all_reduce(&self, tensor: *mut c_void, op: RawOp, timeout: Duration) -> Result<RawWork, String> {
        let mut out = std::ptr::null_mut();
        // SAFETY: live group handle; `tensor` valid per this function's contract.
        call(|err| unsafe { sf_pg_allreduce(self.0.as_ptr(), tensor, op as c_int, millis(timeout), &mut out, err) })?;
        RawWork::from_out(out)
    }

    /// Starts an in-place broadcast from `root`.
    ///
    /// # Safety
    /// As for [`RawGroup::all_reduce`].
    pub(crate) unsafe fn broadcast(&self, tensor: *mut c_void, root: usize, timeout: Duration) -> Result<RawWork, String> {
        let root = c_int::try_from(root).map_err(|_| "root rank out of range".to_string())?;
        let mut out = std::ptr::null_mut();
        // SAFETY: live group handle; `tensor` valid per this function's contract.
        call(|err| unsafe { sf_pg_broadcast(self.0.as_ptr(), tensor, root, millis(timeout), &mut out, err) })?;
        RawWork::from_out(out)
    }

    /// Starts an all-gather of `input` into `outputs` (one per rank).
    ///
    /// # Safety
    /// All pointers must be live tch tensors for the duration of the call.
    pub(crate) unsafe fn all_gather(&self, outputs: &[*mut c_void], input: *mut c_void, timeout: Duration) -> Result<RawWork, String> {
        let mut out = std::ptr::null_mut();
        // SAFETY: live group handle; the pointer array is valid for outputs.len() entries and
        // every entry and `input` are live tensors per this function's contract.
        call(|err| unsafe { sf_pg_allgather(self.0.as_ptr(), outputs.as_ptr(), outputs.len(), input, millis(timeout), &mut out, err) })?;
        RawWork::from_out(out)
    }

    /// Starts a barrier.
    pub(crate) fn barrier(&self, timeout: Duration) -> Result<RawWork, String> {
        let mut out = std::ptr::null_mut();
        // SAFETY: live group handle and out pointer.
        call(|err| unsafe { sf_pg_barrier(self.0.as_ptr(), millis(timeout), &mut out, err) })?;
        RawWork::from_out(out)
    }

    /// Aborts communicators after a failure (NCCL; a no-op for Gloo).
    pub(crate) fn abort(&self) {
        // SAFETY: live group handle; the shim swallows exceptions.
        unsafe { sf_pg_abort(self.0.as_ptr()) }
    }

    /// Clean shutdown of a healthy group (NCCL; a no-op for Gloo).
    pub(crate) fn shutdown(&self) -> Result<(), String> {
        // SAFETY: live group handle.
        call(|err| unsafe { sf_pg_shutdown(self.0.as_ptr(), err) })
    }
}

fn ints(a: usize, b: usize, c: usize) -> Result<(c_int, c_int, c_int), String> {
    let conv = |v: usize| c_int::try_from(v).map_err(|_| format!("{v} is out of range"));
    Ok((conv(a)?, conv(b)?, conv(c)?))
}

impl Drop for RawGroup {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it exactly once; the shim swallows exceptions.
        unsafe { sf_pg_free(self.0.as_ptr()) }
    }
}

/// A started operation (c10d::Work). The C++ work keeps its own references to the tensors.
pub(crate) struct RawWork(NonNull<SfWork>);

// SAFETY: c10d::Work is waited on from whichever thread holds it; wait() locks internally.
unsafe impl Send for RawWork {}

impl RawWork {
    fn from_out(out: *mut SfWork) -> Result<Self, String> {
        NonNull::new(out).map(RawWork).ok_or_else(|| "c10d returned no work".to_string())
    }

    /// Waits at most `timeout` for the operation; its failure or the timeout is the error.
    pub(crate) fn wait(&self, timeout: Duration) -> Result<(), String> {
        // SAFETY: live work handle.
        call(|err| unsafe { sf_work_wait(self.0.as_ptr(), millis(timeout), err) })
    }
}

impl Drop for RawWork {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it exactly once.
        unsafe { sf_work_free(self.0.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    /// The autocast dtype is a libtorch setting, readable without a GPU: bfloat16 is what the
    /// trainer asks for, and it takes.
    #[test]
    fn autocast_dtype_switches_to_bf16() {
        assert!(super::set_autocast_cuda_bf16(true).unwrap());
        assert!(!super::set_autocast_cuda_bf16(false).unwrap());
        assert!(super::set_autocast_cuda_bf16(true).unwrap());
    }
}
