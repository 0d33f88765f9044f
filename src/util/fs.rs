//! Crash-safe file writes: a reader (or a rerun after kill -9) sees the old file or the new one,
//! never half of one.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temp file in the same directory (fsynced) and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = crate::weights::tmp_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_parent(path);
    Ok(())
}

/// fsyncs the directory holding `path` so a rename survives a power cut (best effort: some
/// filesystems refuse to open directories for syncing).
pub fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
}

/// Bytes free for unprivileged writes on the filesystem holding `path` (or its nearest existing
/// ancestor); `None` when it cannot be asked.
pub fn free_space(path: &Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            p = std::path::PathBuf::from(".");
            break;
        }
    }
    if p.as_os_str().is_empty() {
        p = std::path::PathBuf::from(".");
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// An exclusive advisory lock on a file (`flock`), released on drop. Serialises the ranks that
/// rewrite a shared manifest.
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if absent) is held.
    pub fn acquire(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(|e| Error::io(path, e))?;
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on a descriptor we own; the lock dies with the descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io(path, err));
            }
        }
        Ok(FileLock { _file: file })
    }
}
