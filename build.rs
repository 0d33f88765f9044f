//! Gives the binary and test executables an rpath to libtorch (tch-rs #980 / #907): without it they
//! cannot start without LD_LIBRARY_PATH, and on GPU hosts libtorch_cuda.so is never loaded, so
//! `tch::Cuda::is_available()` is silently false.
fn main() {
    println!("cargo:rerun-if-env-changed=TCH_LINK_CUDA");
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::path::PathBuf::from(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        let want_cuda =
            std::env::var("TCH_LINK_CUDA").map(|v| v == "1").unwrap_or(false) || std::env::var_os("CARGO_FEATURE_CUDA").is_some();
        if want_cuda && lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
