//! Where a model runs: `--device cpu|cuda|cuda:N|auto`.

/// A compute device. Model and command code pick it at run time; nothing is generic over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

/// What `--device` asks for: a device, or `auto` (a GPU when one is usable, else the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Exactly(Device),
    Auto,
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceRequest::Exactly(Device::Cpu)),
            "cuda" | "gpu" => Ok(DeviceRequest::Exactly(Device::Cuda(0))),
            "auto" => Ok(DeviceRequest::Auto),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceRequest::Exactly(Device::Cuda(n))),
                _ => Err(format!(
                    "unknown device \"{s}\": use cpu, cuda, cuda:N (N = 0, 1, ...) or auto"
                )),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_rejects_others() {
        let p = |s: &str| s.parse::<DeviceRequest>();
        assert_eq!(p("cpu"), Ok(DeviceRequest::Exactly(Device::Cpu)));
        assert_eq!(p("cuda"), Ok(DeviceRequest::Exactly(Device::Cuda(0))));
        assert_eq!(p("cuda:3"), Ok(DeviceRequest::Exactly(Device::Cuda(3))));
        assert_eq!(p("auto"), Ok(DeviceRequest::Auto));
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1", ""] {
            assert!(p(bad).unwrap_err().contains("unknown device"), "{bad}");
        }
    }
}
