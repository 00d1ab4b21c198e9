//! The compute device a user names on the command line.

use std::fmt;
use std::str::FromStr;

use crate::Device;

/// A device by name: `cpu`, `cuda` (the first GPU) or `cuda:N`. Parsing
/// checks only the name; [`DeviceChoice::open`] opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU (the fast kernels where AVX-512 exists).
    #[default]
    Cpu,
    /// CUDA device N (builds with the `cuda` feature).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; use cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device; says how to get CUDA support into a build without it.
    pub fn open(self) -> Result<Device, String> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(_) if !cfg!(feature = "cuda") => Err(format!(
                "device {self}: this build has no CUDA support; rebuild with --features cuda"
            )),
            DeviceChoice::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| format!("cannot open CUDA device {n}: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (name, want) in [
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            let got: DeviceChoice = name.parse().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string().parse::<DeviceChoice>().unwrap(), want);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda3", "CPU", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("use cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert!(matches!(DeviceChoice::Cpu.open(), Ok(Device::Cpu)));
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceChoice::Cuda(0)
            .open()
            .unwrap_err()
            .contains("--features cuda"));
    }
}
