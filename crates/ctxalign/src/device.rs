//! Where a job runs and in what precision: `--device cpu|cuda|cuda:N`, `--dtype f32|bf16|f16`
//! (inference) and `--precision f32|bf16` (training), shared by the CLI, the examples and xtask.
//!
//! Nothing here picks a device on its own: the default is the CPU in f32, and a CUDA request in a
//! build without the `cuda` feature is an error that names the feature.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
pub use ctxalign_nn::Precision;

use crate::{Error, Result};

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// A CUDA device by ordinal (`cuda:N`).
    Cuda(usize),
    /// `cuda` without a number: GPU 0 — or, in a data-parallel run of one process per GPU, the
    /// process's own GPU (`cuda:LOCAL_RANK`, as torchrun's scripts do it).
    CudaLocal,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::CudaLocal),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| format!("`{s}`: a CUDA device is `cuda:N` with N a device number (0, 1, …)")),
                None => Err(format!("unknown device `{s}`: expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::CudaLocal => f.write_str("cuda"),
        }
    }
}

/// True when this build can run on CUDA (the `cuda` feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// Opens the device. A CUDA device in a build without the `cuda` feature, or one the driver
    /// cannot open, is an [`Error::Device`].
    pub fn open(&self) -> Result<Device> {
        match *self {
            Self::Cpu => Ok(Device::Cpu),
            Self::CudaLocal => Self::Cuda(0).open(),
            Self::Cuda(_) if !CUDA_BUILT => Err(Error::Device {
                device: self.to_string(),
                reason: "this build of ctxalign has no CUDA support; rebuild with `--features cuda` \
                         (e.g. `cargo build --release --features cuda`)"
                    .into(),
            }),
            Self::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| Error::Device { device: self.to_string(), reason: e.to_string() })
            }
        }
    }
}

impl DeviceSpec {
    /// The device of the process with `local_rank` on its machine: `cuda` becomes `cuda:LOCAL_RANK`;
    /// `cpu` and an explicit `cuda:N` (several ranks on one GPU) stay.
    pub fn for_local_rank(self, local_rank: usize) -> Self {
        match self {
            Self::CudaLocal => Self::Cuda(local_rank),
            other => other,
        }
    }

    /// Whether this names a CUDA device (`cuda` or `cuda:N`).
    pub fn is_cuda(&self) -> bool {
        !matches!(self, Self::Cpu)
    }
}

/// The name of an open device, as [`DeviceSpec`] writes it (for records and benchmark JSON).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Parses an inference dtype: `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        _ => Err(format!("unknown dtype `{s}`: expected f32, bf16 or f16")),
    }
}

/// Where a recipe runs and in what precision; recorded in its `training.json`.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The device the model runs on.
    pub device: Device,
    /// f32, or bf16 with f32 master weights and optimizer state.
    pub precision: Precision,
}

impl Runtime {
    /// The CPU in f32: the default of every recipe.
    pub fn cpu() -> Self {
        Self { device: Device::Cpu, precision: Precision::F32 }
    }
    /// A runtime on `device` in `precision`.
    pub fn new(device: Device, precision: Precision) -> Self {
        Self { device, precision }
    }
    /// The dtype of the model's parameters and activations.
    pub fn dtype(&self) -> DType {
        self.precision.compute_dtype()
    }
    /// `{"device": "cuda:0", "precision": "bf16"}` for run records.
    pub fn record(&self) -> serde_json::Value {
        serde_json::json!({ "device": device_name(&self.device), "precision": self.precision.as_str() })
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Self::cpu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::CudaLocal);
        assert_eq!(DeviceSpec::CudaLocal.for_local_rank(3), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(1).for_local_rank(3), DeviceSpec::Cuda(1), "an explicit GPU stays");
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().unwrap_err().contains("cuda:N"));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("expected cpu, cuda or cuda:N"));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f8").unwrap_err().contains("f32, bf16 or f16"));
    }

    #[test]
    fn cuda_in_a_cpu_build_names_the_feature() {
        if CUDA_BUILT {
            return; // a CUDA build opens (or fails to open) a real device instead
        }
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("cuda:0") && err.contains("--features cuda"), "{err}");
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }
}
