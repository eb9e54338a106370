//! The launcher's workload options, parsed: `--add HOST[:GUEST]`, `--run
//! CMD` (split into words like a shell, no expansion), `--churn`.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A bad option value (the launcher exits [`super::status::USAGE`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArgError(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, ArgError> {
    Err(ArgError(msg.into()))
}

/// Guest paths a user's file may not take: the agent, the workload's
/// description, and the mount points the agent mounts over.
const RESERVED: &[&str] = &["init", "etc/workload.json", "proc", "sys", "dev"];

/// One `--add`: a host file or directory and where it goes in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Add {
    /// On this machine.
    pub host: PathBuf,
    /// Absolute, normalised guest path.
    pub guest: String,
}

/// Parses `--add HOST[:GUEST]`: GUEST defaults to `/bin/NAME` for a file
/// and `/NAME` for a directory; a GUEST ending in `/` is a directory the
/// host file or directory goes into, except that a directory added at `/`
/// becomes the root (its contents merge into the guest's `/`, a root file
/// system of your own, say). The last `:` followed by `/` splits
/// the two, so host paths with other colons work. `is_dir` says whether a
/// host path is a directory.
pub fn parse_add(arg: &str, is_dir: impl Fn(&Path) -> bool) -> Result<Add, ArgError> {
    let (host, guest) = match arg.rfind(":/") {
        Some(i) => (&arg[..i], Some(&arg[i + 1..])),
        None => (arg, None),
    };
    if host.is_empty() {
        return bad(format!("--add {arg:?}: no host path"));
    }
    let host = PathBuf::from(host);
    let Some(name) = host.file_name().and_then(|n| n.to_str()) else {
        return bad(format!(
            "--add {arg:?}: cannot tell the file's name; give its guest path (HOST:/path)"
        ));
    };
    let dir = is_dir(&host);
    let guest = match guest {
        None if dir => format!("/{name}"),
        None => format!("/bin/{name}"),
        // A directory added at `/` becomes the root: its contents merge.
        Some("/") if dir => "/".to_owned(),
        Some(g) if g.ends_with('/') => format!("{g}{name}"),
        Some(g) => g.to_owned(),
    };
    let guest = normalize_guest(&guest).map_err(|e| ArgError(format!("--add {arg:?}: {e}")))?;
    Ok(Add { host, guest })
}

/// `/a//b/./c/` -> `/a/b/c`; refuses `..` and the reserved paths.
pub fn normalize_guest(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("the guest path {path:?} is not absolute"));
    }
    let mut parts = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(format!("the guest path {path:?} has `..` in it"));
        }
        parts.push(part);
    }
    let rel = parts.join("/");
    if let Some(r) = RESERVED
        .iter()
        .find(|r| rel == **r || rel.starts_with(&format!("{r}/")))
    {
        return Err(format!(
            "the guest path {path:?} is the agent's (/{r}): choose another place"
        ));
    }
    Ok(format!("/{rel}"))
}

/// Whether a relative path inside an added directory lands on a reserved
/// guest path (checked for every file of a directory added at `/`).
pub fn reserved(guest_path: &str) -> bool {
    normalize_guest(guest_path).is_err()
}

/// Splits `--run`'s text into words like a POSIX shell does, without any
/// expansion: whitespace separates, `'...'` is literal, `"..."` keeps
/// spaces (with `\"`, `\\`, `\$` and `` \` `` escapes), a backslash outside
/// quotes escapes the next character.
pub fn split_command(text: &str) -> Result<Vec<String>, ArgError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return bad(format!("--run {text:?}: unterminated '")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return bad(format!("--run {text:?}: unterminated \"")),
                        },
                        Some(c) => word.push(c),
                        None => return bad(format!("--run {text:?}: unterminated \"")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return bad(format!("--run {text:?}: ends with a backslash")),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        return bad("--run: no command");
    }
    Ok(words)
}

/// A duration: `500ms`, `0.5s`, `2` (seconds), `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, ArgError> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .map(|v| v * scale)
        .filter(|v| v.is_finite() && *v >= 0.0 && *v < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| ArgError(format!("{text:?} is not a duration (500ms, 0.5s, 2, 1m)")))
}

/// One step of a churn: at `at` after the workload started, resize to
/// `vcpus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// When, from the workload's start.
    pub at: Duration,
    /// vCPUs present after it.
    pub vcpus: u32,
}

/// What `--churn` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Churn {
    /// `--churn "0.5s:4,1s:1"`: these steps, in order.
    Schedule(Vec<Step>),
    /// `--churn random`: every `interval`, a resize to a count drawn
    /// from `1..=max` other than the current one (SplitMix64 seeded with
    /// `seed`, so a seed always gives the same steps), `steps` times
    /// (`None`: until the workload ends).
    Random {
        /// The generator's seed.
        seed: u64,
        /// The largest count drawn.
        max: u32,
        /// Time between two steps (the first comes one interval in).
        interval: Duration,
        /// How many steps.
        steps: Option<u32>,
    },
}

/// Parses a schedule: `TIME:COUNT` pairs separated by commas, times not
/// decreasing, counts between 1 and `max`.
pub fn parse_schedule(text: &str, max: u32) -> Result<Vec<Step>, ArgError> {
    let mut steps: Vec<Step> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((at, n)) = item.split_once(':') else {
            return bad(format!("--churn: {item:?} is not TIME:COUNT (e.g. 0.5s:4)"));
        };
        let at = parse_duration(at).map_err(|e| ArgError(format!("--churn: {e}")))?;
        let vcpus: u32 = n
            .trim()
            .parse()
            .map_err(|_| ArgError(format!("--churn: {n:?} is not a vCPU count")))?;
        if vcpus == 0 || vcpus > max {
            return bad(format!(
                "--churn: {vcpus} vCPUs: between 1 and {max} (--cpus max)"
            ));
        }
        if steps.last().is_some_and(|s| s.at > at) {
            return bad(format!(
                "--churn: {item:?} comes before the step ahead of it"
            ));
        }
        steps.push(Step { at, vcpus });
    }
    if steps.is_empty() {
        return bad("--churn: no steps");
    }
    Ok(steps)
}

/// SplitMix64: small, fast, and the same on every platform and version.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Churn {
    /// Its steps, starting from `boot` vCPUs present (endless for an
    /// unbounded random churn).
    pub fn steps(&self, boot: u32) -> Box<dyn Iterator<Item = Step> + Send> {
        match self {
            Churn::Schedule(steps) => Box::new(steps.clone().into_iter()),
            Churn::Random {
                seed,
                max,
                interval,
                steps,
            } => {
                let (max, interval) = (*max, *interval);
                let mut rng = SplitMix64::new(*seed);
                let mut current = boot;
                let mut i = 0u32;
                let iter = std::iter::from_fn(move || {
                    i += 1;
                    let vcpus = if max <= 1 {
                        1
                    } else {
                        // Uniform over 1..=max without the current count.
                        let others = u64::from(max - 1);
                        let pick = 1 + u32::try_from(rng.next_u64() % others).unwrap_or(0);
                        if pick >= current {
                            pick + 1
                        } else {
                            pick
                        }
                    };
                    current = vcpus;
                    Some(Step {
                        at: interval * i,
                        vcpus,
                    })
                });
                match steps {
                    Some(n) => Box::new(iter.take(*n as usize)),
                    None => Box::new(iter),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn add_paths() {
        let file = |_: &Path| false;
        let dir = |_: &Path| true;
        let add = |a: &str, d: bool| parse_add(a, |_: &Path| d);
        assert_eq!(
            parse_add("./target/release/mytest:/bin/mytest", file).unwrap(),
            Add {
                host: "./target/release/mytest".into(),
                guest: "/bin/mytest".into()
            }
        );
        assert_eq!(add("./mytest", false).unwrap().guest, "/bin/mytest");
        assert_eq!(add("data/", true).unwrap().guest, "/data");
        assert_eq!(add("./data:/opt/", true).unwrap().guest, "/opt/data");
        assert_eq!(
            add("./x:/usr//local/./bin/y", false).unwrap().guest,
            "/usr/local/bin/y"
        );
        assert_eq!(
            parse_add("/odd:name:/y", file).unwrap(),
            Add {
                host: "/odd:name".into(),
                guest: "/y".into()
            }
        );
        assert_eq!(add("./rootfs:/", true).unwrap().guest, "/");
        for (arg, why) in [
            ("x:/init", "agent"),
            ("x:/etc/workload.json", "agent"),
            ("x:/proc/x", "agent"),
            ("x:/dev/", "agent"),
            ("x:/a/../b", ".."),
            (":/x", "no host path"),
            ("/", "name"),
        ] {
            let e = parse_add(arg, dir).unwrap_err().0;
            assert!(e.contains(why), "{arg}: {e}");
        }
        assert!(reserved("/init") && reserved("/proc/1") && !reserved("/initrd"));
    }

    #[test]
    fn run_splits_like_a_shell() {
        let s = |t: &str| split_command(t).unwrap();
        assert_eq!(
            s("/bin/mytest --iterations 100"),
            ["/bin/mytest", "--iterations", "100"]
        );
        assert_eq!(
            s("  a 'b c'  \"d \\\"e\\\" $x\" f\\ g "),
            ["a", "b c", "d \"e\" $x", "f g"]
        );
        assert_eq!(s("''"), [""]);
        assert_eq!(s("a\"b\"'c'"), ["abc"]);
        assert_eq!(s("\"\\n\""), ["\\n"]);
        for bad in ["", "   ", "'open", "\"open", "trailing\\"] {
            assert!(split_command(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_and_schedules() {
        assert_eq!(parse_duration("500ms").unwrap(), ms(500));
        assert_eq!(parse_duration("0.5s").unwrap(), ms(500));
        assert_eq!(parse_duration("2").unwrap(), ms(2000));
        assert_eq!(parse_duration("1m").unwrap(), ms(60_000));
        for bad in ["", "-1s", "x", "1h", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_schedule("0.5s:4, 1s:1,1s:8,2500ms:2", 8).unwrap(),
            [
                Step {
                    at: ms(500),
                    vcpus: 4
                },
                Step {
                    at: ms(1000),
                    vcpus: 1
                },
                Step {
                    at: ms(1000),
                    vcpus: 8
                },
                Step {
                    at: ms(2500),
                    vcpus: 2
                },
            ]
        );
        for (bad, why) in [
            ("1s:9", "between 1 and 8"),
            ("1s:0", "between 1 and 8"),
            ("2s:1,1s:2", "before"),
            ("1s", "TIME:COUNT"),
            ("x:1", "duration"),
            ("1s:x", "count"),
            ("", "no steps"),
        ] {
            let e = parse_schedule(bad, 8).unwrap_err().0;
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn random_churn_is_seeded_bounded_and_always_changes() {
        let churn = Churn::Random {
            seed: 42,
            max: 4,
            interval: ms(1000),
            steps: Some(50),
        };
        let steps: Vec<Step> = churn.steps(1).collect();
        assert_eq!(steps.len(), 50);
        assert_eq!(
            steps,
            churn.steps(1).collect::<Vec<_>>(),
            "same seed, same steps"
        );
        let mut current = 1;
        for (i, s) in steps.iter().enumerate() {
            assert!((1..=4).contains(&s.vcpus));
            assert_ne!(s.vcpus, current, "step {i} changes nothing");
            assert_eq!(s.at, ms(1000) * (u32::try_from(i).unwrap() + 1));
            current = s.vcpus;
        }
        for n in 1..=4 {
            assert!(steps.iter().any(|s| s.vcpus == n), "{n} never drawn");
        }
        let other = Churn::Random {
            seed: 43,
            max: 4,
            interval: ms(1000),
            steps: Some(50),
        };
        assert_ne!(steps, other.steps(1).collect::<Vec<_>>());
        // Pinned: SplitMix64's reference outputs for seed 0.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        // Unbounded, and a single vCPU.
        let endless = Churn::Random {
            seed: 1,
            max: 1,
            interval: ms(10),
            steps: None,
        };
        assert!(endless.steps(1).take(1000).all(|s| s.vcpus == 1));
    }
}
