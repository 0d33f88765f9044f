//! Build script.
//!
//! 1. Gives the binary and test executables an rpath to libtorch (tch-rs #980 / #907): without it
//!    they cannot start without LD_LIBRARY_PATH, and on GPU hosts libtorch_cuda.so is never loaded,
//!    so `tch::Cuda::is_available()` is silently false.
//! 2. Compiles the distributed shim (src/dist/shim.cpp): a thin C ABI over PyTorch's own c10d
//!    (TCPStore, ProcessGroupGloo; ProcessGroupNCCL with the `nccl` feature) inside libtorch. The
//!    gloo headers ProcessGroupGloo.hpp includes are not shipped in the torch wheel; they come from
//!    Debian's libgloo-dev (/usr/include/gloo, installed by scripts/setup.sh). Only headers are used:
//!    gloo itself is linked into libtorch_cpu.so.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=TCH_LINK_CUDA");
    println!("cargo:rerun-if-env-changed=SPECFORGE_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/dist/shim.cpp");
    let nccl = std::env::var_os("CARGO_FEATURE_NCCL").is_some();
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        // torch-sys always exports it on Linux; without it there is no libtorch to build against.
        panic!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not find libtorch (set LIBTORCH)");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let want_cuda =
        std::env::var("TCH_LINK_CUDA").map(|v| v == "1").unwrap_or(false) || std::env::var_os("CARGO_FEATURE_CUDA").is_some() || nccl;
    if want_cuda && lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    } else if nccl {
        panic!("the `nccl` feature needs {}: ProcessGroupNCCL lives in libtorch_cuda", lib.join("libtorch_cuda.so").display());
    }
    build_dist_shim(&lib, nccl);
}

/// Compiles src/dist/shim.cpp against the libtorch whose lib directory is `lib`.
fn build_dist_shim(lib: &Path, nccl: bool) {
    let torch = lib.parent().unwrap_or(lib).to_path_buf();
    let include = torch.join("include");
    let gloo_dir = std::env::var_os("GLOO_INCLUDE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/include"));
    if !gloo_dir.join("gloo/rendezvous/store.h").exists() {
        panic!(
            "gloo headers not found at {}/gloo: install Debian's libgloo-dev (scripts/setup.sh \
             does: apt-get install -y libgloo-dev) or point GLOO_INCLUDE at a directory holding \
             gloo/. ProcessGroupGloo.hpp includes them and the torch wheel does not ship them.",
            gloo_dir.display()
        );
    }
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .file("src/dist/shim.cpp")
        .flag("-std=c++17")
        // These select the c10d classes in the headers; the wheel's Caffe2Targets.cmake lists the
        // same defines for the library itself, so our view of the classes matches its build.
        .define("USE_DISTRIBUTED", None)
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None);
    // -isystem: torch's and CUDA's headers warn a lot under -Wall; our own code keeps its warnings.
    let mut system = vec![include.clone(), include.join("torch/csrc/api/include")];
    if gloo_dir != Path::new("/usr/include") {
        system.push(gloo_dir);
    }
    if nccl {
        b.define("USE_C10D_NCCL", None).define("USE_CUDA", None).define("SF_NCCL", None);
        system.extend(cuda_include_dirs(&torch));
    }
    for dir in &system {
        b.flag("-isystem").flag(dir.to_string_lossy().as_ref());
    }
    b.compile("specforge_dist_shim");
    if nccl {
        // The shim calls into libtorch_cuda (ProcessGroupNCCL) and libc10_cuda (set_device).
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// Header directories ProcessGroupNCCL.hpp needs: the CUDA runtime (cuda_runtime_api.h and its
/// crt/ and cccl parts) and nccl.h. The pip layout next to torch has the runtime and NCCL headers;
/// crt/ and cccl come from the header-only wheels nvidia-cuda-crt / nvidia-cuda-cccl
/// (`scripts/setup.sh --nccl` puts them in .cache/cuda-headers), from a CUDA toolkit (CUDA_HOME,
/// /usr/local/cuda), or from SPECFORGE_CUDA_INCLUDE (colon-separated directories).
fn cuda_include_dirs(torch: &Path) -> Vec<PathBuf> {
    let nvidia = torch.parent().map(|p| p.join("nvidia"));
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(extra) = std::env::var_os("SPECFORGE_CUDA_INCLUDE") {
        candidates.extend(std::env::split_paths(&extra));
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    candidates.push(manifest.join(".cache/cuda-headers/nvidia/cu13/include"));
    if let Some(nv) = &nvidia {
        candidates.push(nv.join("cu13/include"));
        candidates.push(nv.join("nccl/include"));
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let mut dirs = Vec::new();
    for c in candidates {
        if c.is_dir() {
            let cccl = c.join("cccl");
            dirs.push(c);
            if cccl.is_dir() {
                dirs.push(cccl);
            }
        }
    }
    let has = |rel: &str| dirs.iter().any(|d| d.join(rel).exists());
    for (rel, hint) in [
        ("cuda_runtime_api.h", "nvidia-cuda-runtime (a torch dependency)"),
        ("crt/host_config.h", "nvidia-cuda-crt==13.0.88"),
        ("cuda/std/cstdint", "nvidia-cuda-cccl==13.0.85"),
        ("nccl.h", "nvidia-nccl-cu13==2.28.9 (a torch dependency)"),
    ] {
        if !has(rel) {
            panic!(
                "the `nccl` feature needs {rel} (from {hint}); run `scripts/setup.sh --nccl` or \
                 set SPECFORGE_CUDA_INCLUDE / CUDA_HOME. Searched: {dirs:?}"
            );
        }
    }
    dirs
}
