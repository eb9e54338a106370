//! Options that `vmm` and the launcher (`launch`, `scripts/run-vm`) both
//! take, parsed here once so that they mean the same in both.
//!
//! - `--memory SIZE`: guest memory. A whole number with an optional unit
//!   `K`, `M` or `G` (binary: KiB, MiB, GiB; either case); **a plain number
//!   is MiB** (`--memory 512` is `512M`, as QEMU's `-m`). The size must be
//!   a whole number of MiB, at least [`MIN_MEMORY_MIB`] and at most
//!   [`MAX_MEMORY_MIB`].
//! - `--cmdline STRING`: the guest kernel command line, **replacing** the
//!   default (each program's own: `vmm`'s [`VMM_DEFAULT_CMDLINE`], the
//!   launcher's the default guest image's). `--append STRING` adds
//!   parameters at the end (of the default, or of `--cmdline`).

use thiserror::Error;

/// The smallest guest memory, in MiB.
pub const MIN_MEMORY_MIB: u32 = 32;
/// The largest guest memory, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// Help text of `--memory`, the same in both programs.
pub const MEMORY_HELP: &str = "Guest memory: a number with an optional unit K, M or G \
(binary: KiB, MiB, GiB); a plain number is MiB (512 = 512M). A whole number of MiB, \
32M to 1024G";
/// Help text of `vmm --cmdline` (the launcher's says the same of its own
/// default).
pub const VMM_CMDLINE_HELP: &str = "Guest kernel command line, replacing the default \
(console=ttyS0 reboot=acpi panic=-1); --append adds to it instead";
/// Help text of `--append`, the same in both programs.
pub const APPEND_HELP: &str = "Parameters added at the end of the guest kernel command \
line (the default's, or --cmdline's)";

/// `vmm`'s default guest command line (without `--cmdline`).
pub const VMM_DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1";

/// Why a `--memory` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemoryError {
    /// Not a number with an optional unit.
    #[error("invalid --memory {0:?}: expected a size like 256M, 1G or 512 (MiB)")]
    Syntax(String),
    /// Not a whole number of MiB.
    #[error("invalid --memory {0:?}: not a whole number of MiB")]
    Fraction(String),
    /// Below the minimum or above the maximum.
    #[error("invalid --memory {0:?}: between 32M and 1024G")]
    Range(String),
}

/// A guest memory size, a whole number of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Memory {
    mib: u32,
}

impl Memory {
    /// The size in MiB.
    pub fn mib(self) -> u32 {
        self.mib
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.mib) << 20
    }
}

impl std::fmt::Display for Memory {
    /// The form both programs take back: `256M`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}M", self.mib)
    }
}

impl std::str::FromStr for Memory {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_memory(s)
    }
}

/// Parses `--memory` (see the module docs).
pub fn parse_memory(s: &str) -> Result<Memory, MemoryError> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10u32),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 20),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MemoryError::Syntax(s.to_owned()));
    }
    // Too many digits for any valid size is out of range, not bad syntax.
    let n: u64 = digits
        .parse()
        .map_err(|_| MemoryError::Range(s.to_owned()))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| MemoryError::Range(s.to_owned()))?;
    if bytes % (1 << 20) != 0 {
        return Err(MemoryError::Fraction(s.to_owned()));
    }
    match u32::try_from(bytes >> 20) {
        Ok(mib) if (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) => Ok(Memory { mib }),
        _ => Err(MemoryError::Range(s.to_owned())),
    }
}

/// The guest command line from a program's `default`, `--cmdline` (which
/// replaces it) and `--append` (added at the end, after one space); each
/// part's leading and trailing blanks are dropped, its inside kept as given
/// (a quoted value keeps its spaces).
pub fn compose_cmdline(default: &str, cmdline: Option<&str>, append: Option<&str>) -> String {
    [cmdline.unwrap_or(default), append.unwrap_or("")]
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(s: &str) -> u32 {
        parse_memory(s).unwrap_or_else(|e| panic!("{s}: {e}")).mib()
    }

    #[test]
    fn memory_units_and_a_plain_number_is_mib() {
        assert_eq!(mib("256M"), 256);
        assert_eq!(mib("256m"), 256);
        assert_eq!(mib("1G"), 1024);
        assert_eq!(mib("2g"), 2048);
        assert_eq!(mib("512"), 512);
        assert_eq!(mib(" 64M "), 64);
        assert_eq!(mib("65536K"), 64);
        assert_eq!(mib("32"), MIN_MEMORY_MIB);
        assert_eq!(mib("1024G"), MAX_MEMORY_MIB);
        assert_eq!(parse_memory("1G").unwrap().bytes(), 1 << 30);
        assert_eq!(parse_memory("300").unwrap().to_string(), "300M");
        assert_eq!("300M".parse::<Memory>(), parse_memory("300"));
    }

    #[test]
    fn memory_refusals_say_why() {
        for bad in [
            "", "M", "12X", "-1G", "1.5G", "0x100", "256 M", "+256M", "256MB",
        ] {
            assert!(
                matches!(parse_memory(bad), Err(MemoryError::Syntax(_))),
                "{bad}"
            );
        }
        for bad in ["1536K", "1K"] {
            assert!(
                matches!(parse_memory(bad), Err(MemoryError::Fraction(_))),
                "{bad}"
            );
        }
        for bad in [
            "0",
            "31M",
            "16",
            "1025G",
            "99999999999G",
            "999999999999999999999999",
        ] {
            assert!(
                matches!(parse_memory(bad), Err(MemoryError::Range(_))),
                "{bad}"
            );
        }
        assert!(parse_memory("12X")
            .unwrap_err()
            .to_string()
            .contains("\"12X\""));
    }

    #[test]
    fn the_help_names_the_default() {
        assert!(VMM_CMDLINE_HELP.contains(&format!("({VMM_DEFAULT_CMDLINE})")));
        assert!(MEMORY_HELP.contains("plain number is MiB"));
    }

    #[test]
    fn cmdline_replaces_and_append_adds() {
        let default = "console=ttyS0 quiet";
        assert_eq!(compose_cmdline(default, None, None), default);
        assert_eq!(
            compose_cmdline(default, Some("console=ttyS0 loglevel=7"), None),
            "console=ttyS0 loglevel=7"
        );
        assert_eq!(
            compose_cmdline(default, None, Some("loglevel=7")),
            "console=ttyS0 quiet loglevel=7"
        );
        assert_eq!(
            compose_cmdline(default, Some(" a "), Some(" b=\"x  y\" c ")),
            "a b=\"x  y\" c"
        );
        // An empty --cmdline is an empty command line, not the default.
        assert_eq!(compose_cmdline(default, Some(""), None), "");
        assert_eq!(compose_cmdline(default, Some(""), Some("x")), "x");
    }
}
