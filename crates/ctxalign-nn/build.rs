//! With feature `cuda`, compiles kernels/ctxalign.cu to PTX (loaded at run time by
//! `src/cuda_kernels.rs`) with the `nvcc` that builds Candle's own kernels: `$NVCC`, else
//! `$CUDA_ROOT/bin/nvcc` (or `$CUDA_PATH`), else `nvcc` on the PATH; for `$CUDA_COMPUTE_CAP`
//! (default 90, H100/H200), as Candle's build does.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/ctxalign.cu");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let root = std::env::var_os("CUDA_ROOT").or_else(|| std::env::var_os("CUDA_PATH")).map(PathBuf::from);
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| match &root {
        Some(r) if r.join("bin/nvcc").is_file() => r.join("bin/nvcc"),
        _ => PathBuf::from("nvcc"),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("ctxalign.ptx");
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}")]);
    if let Some(r) = &root {
        cmd.arg(format!("-I{}", r.join("include").display()));
    }
    cmd.arg("kernels/ctxalign.cu").arg("-o").arg(&out);
    let status = cmd.status().unwrap_or_else(|e| panic!("running {} (set NVCC or CUDA_ROOT): {e}", nvcc.display()));
    assert!(status.success(), "{} could not compile kernels/ctxalign.cu ({status})", nvcc.display());
}
