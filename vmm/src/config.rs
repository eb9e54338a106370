//! VM configuration: what the command line (or a test) asks for, parsed
//! and validated once, then handed to the builder.

use std::path::PathBuf;
use std::str::FromStr;

use crate::boot::KernelSpec;

/// Highest vCPU count supported: APIC IDs must stay below 255 for the
/// xAPIC-mode in-kernel IOAPIC to reach every vCPU without interrupt
/// remapping.
pub const MAX_VCPUS: u32 = 254;

/// Configuration errors (messages name the offending option).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `--cpus` could not be parsed.
    #[error("invalid --cpus {0:?}: expected boot=N,max=M (or N)")]
    CpusSyntax(String),
    /// Impossible vCPU counts.
    #[error("invalid --cpus: need 1 <= boot ({boot}) <= max ({max}) <= {MAX_VCPUS}")]
    CpusRange {
        /// Boot vCPUs.
        boot: u32,
        /// Maximum vCPUs.
        max: u32,
    },
    /// `--serial` could not be parsed.
    #[error("invalid --serial {0:?}: expected stdout, off or file:PATH")]
    SerialSyntax(String),
    /// `--hotplug-timeouts` could not be parsed.
    #[error(
        "invalid --hotplug-timeouts {0:?}: expected KEY=SECONDS,... with keys \
         add, prepare, eject, restore and 0.1 <= SECONDS <= 3600"
    )]
    TimeoutsSyntax(String),
}

/// Parses `--hotplug-timeouts add=30,prepare=10,eject=30,restore=10`
/// (seconds, fractions allowed; keys left out keep their default).
pub fn parse_timeouts(s: &str) -> Result<crate::hotplug::Timeouts, ConfigError> {
    let bad = || ConfigError::TimeoutsSyntax(s.to_owned());
    let mut t = crate::hotplug::Timeouts::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(bad)?;
        let secs: f64 = value.trim().parse().map_err(|_| bad())?;
        if !(0.1..=3600.0).contains(&secs) {
            return Err(bad());
        }
        let d = std::time::Duration::from_secs_f64(secs);
        match key.trim() {
            "add" => t.add = d,
            "prepare" => t.prepare = d,
            "eject" => t.eject = d,
            "restore" => t.restore = d,
            _ => return Err(bad()),
        }
    }
    Ok(t)
}

/// Boot and maximum vCPU counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpusConfig {
    /// vCPUs present at boot (ids 0..boot).
    pub boot: u32,
    /// Possible vCPUs (ids 0..max), the hotplug ceiling.
    pub max: u32,
}

impl CpusConfig {
    /// Validated counts.
    pub fn new(boot: u32, max: u32) -> Result<Self, ConfigError> {
        if boot == 0 || boot > max || max > MAX_VCPUS {
            return Err(ConfigError::CpusRange { boot, max });
        }
        Ok(Self { boot, max })
    }
}

impl FromStr for CpusConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || ConfigError::CpusSyntax(s.to_string());
        let num = |v: &str| v.trim().parse::<u32>().map_err(|_| syntax());
        if let Ok(n) = s.trim().parse::<u32>() {
            return Self::new(n, n);
        }
        let (mut boot, mut max) = (None, None);
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(syntax)?;
            match k.trim() {
                "boot" if boot.is_none() => boot = Some(num(v)?),
                "max" if max.is_none() => max = Some(num(v)?),
                _ => return Err(syntax()),
            }
        }
        let boot = boot.ok_or_else(syntax)?;
        Self::new(boot, max.unwrap_or(boot))
    }
}

/// Where the console UART's output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded.
    Off,
}

impl FromStr for SerialOutput {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "off" | "null" => Ok(Self::Off),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(ConfigError::SerialSyntax(s.to_string())),
            },
        }
    }
}

/// Everything needed to build and run a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel, initramfs, command line.
    pub kernel: KernelSpec,
    /// vCPU counts.
    pub cpus: CpusConfig,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Where the HTTP API listens, if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Console output.
    pub serial: SerialOutput,
    /// Serve the test-hook API routes (fault injection) and honour them:
    /// for end-to-end tests only. Off, those routes answer 404.
    pub test_hooks: bool,
    /// How long the guest has for each hotplug step.
    pub timeouts: crate::hotplug::Timeouts,
    /// Drop to this user once /dev/kvm, the guest images and the API
    /// socket are open, before any vCPU runs (`privileges::drop_to`).
    pub user: Option<crate::privileges::User>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse() {
        let t = parse_timeouts("add=5,eject=2.5").unwrap();
        assert_eq!(t.add, std::time::Duration::from_secs(5));
        assert_eq!(t.eject, std::time::Duration::from_millis(2500));
        assert_eq!(t.prepare, crate::hotplug::Timeouts::default().prepare);
        for bad in ["add", "add=x", "add=0", "add=1e9", "nap=3", "add=-1"] {
            assert!(parse_timeouts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpus_syntax() {
        assert_eq!("boot=2,max=8".parse(), Ok(CpusConfig { boot: 2, max: 8 }));
        assert_eq!("max=8, boot=1".parse(), Ok(CpusConfig { boot: 1, max: 8 }));
        assert_eq!("4".parse(), Ok(CpusConfig { boot: 4, max: 4 }));
        assert_eq!("boot=3".parse(), Ok(CpusConfig { boot: 3, max: 3 }));
        for bad in [
            "",
            "boot=x",
            "max=4",
            "boot=1,boot=2",
            "cpus=2",
            "boot=2,max=8,x=1",
        ] {
            assert!(
                matches!(bad.parse::<CpusConfig>(), Err(ConfigError::CpusSyntax(_))),
                "{bad}"
            );
        }
        for bad in ["boot=0,max=2", "boot=3,max=2", "boot=1,max=255", "0"] {
            assert!(
                matches!(
                    bad.parse::<CpusConfig>(),
                    Err(ConfigError::CpusRange { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn serial_output() {
        assert_eq!("stdout".parse(), Ok(SerialOutput::Stdout));
        assert_eq!("off".parse(), Ok(SerialOutput::Off));
        assert_eq!(
            "file:/tmp/c".parse(),
            Ok(SerialOutput::File("/tmp/c".into()))
        );
        assert!("file:".parse::<SerialOutput>().is_err());
        assert!("tty".parse::<SerialOutput>().is_err());
    }
}
