//! What the property tests share: they run the fuzz targets' bodies under
//! stable `cargo test`, on the committed corpus (`fuzz/corpus/<target>`:
//! seeds and every crash input found so far) and on seeded random inputs
//! (generated, or mutated corpus entries). Included by
//! `agent-proto/tests/fuzz_props.rs`, `vmm/tests/fuzz_props.rs` and
//! `guest/tests/fuzz_props.rs` (`#[path]`), so it depends only on `rand`.
//!
//! `FUZZ_CASES` sets the number of random inputs per target (the default
//! keeps each test to about a second), `FUZZ_SEED` the seed (else a fixed
//! one: CI runs the same inputs every time). A failing input is written to
//! `$TMPDIR/fuzz-props/<target>-<hash>` and its path printed: copy it into
//! `fuzz/corpus/<target>/` to keep it as a regression case, or feed it to
//! `cargo +nightly fuzz run <target> <file>`.
#![allow(dead_code)]

use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::{catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random inputs per target: `FUZZ_CASES`, else `default`.
pub fn cases(default: usize) -> usize {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seeded generator of `target`: `FUZZ_SEED` (else a fixed seed)
/// mixed with the target's name.
pub fn rng(target: &str) -> (StdRng, u64) {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f022_u64);
    let mut h = DefaultHasher::new();
    target.hash(&mut h);
    (StdRng::seed_from_u64(seed ^ h.finish()), seed)
}

/// The corpus directory of `target`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Every file of `target`'s committed corpus, by name.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

/// Bytes a mutation likes to insert: protocol delimiters and limits.
const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\n",
    b"\r\n",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"=",
    b"@",
    b"-",
    b"\xff",
    b"\xc3",
    b"0",
    b"4294967295",
    b"4294967296",
    b"65535",
    b"-1",
    b"1e9",
    b"null",
    b"\r\n\r\n",
    b"%",
    b"?",
    b"/",
];

/// A few random edits of `data`: bit flips, byte sets, insertions of
/// interesting tokens or of a piece of another input, deletions,
/// duplications, truncation.
pub fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, pool: &[Vec<u8>]) {
    let edits = rng.gen_range(1..=8);
    for _ in 0..edits {
        let at = if data.is_empty() {
            0
        } else {
            rng.gen_range(0..=data.len())
        };
        match rng.gen_range(0..8) {
            0 if at < data.len() => data[at] ^= 1 << rng.gen_range(0..8),
            1 if at < data.len() => data[at] = rng.gen(),
            2 => {
                let token = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                data.splice(at..at, token.iter().copied());
            }
            3 if !pool.is_empty() => {
                let other = &pool[rng.gen_range(0..pool.len())];
                if !other.is_empty() {
                    let start = rng.gen_range(0..other.len());
                    let end = rng.gen_range(start..=other.len());
                    data.splice(at..at, other[start..end].iter().copied());
                }
            }
            4 if at < data.len() => {
                let end = rng.gen_range(at..=data.len().min(at + 64));
                data.drain(at..end);
            }
            5 if at < data.len() => {
                let end = rng.gen_range(at..=data.len().min(at + 256));
                let piece = data[at..end].to_vec();
                let times = rng.gen_range(1..=4);
                for _ in 0..times {
                    data.splice(at..at, piece.iter().copied());
                }
            }
            6 => data.truncate(at),
            _ => {
                let n = rng.gen_range(1..=16);
                data.splice(at..at, (0..n).map(|_| rng.gen::<u8>()));
            }
        }
    }
}

/// Random bytes, up to `max`.
pub fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..=max);
    (0..n).map(|_| rng.gen()).collect()
}

/// Runs `body` on `input`; on a panic saves the input, says where, and
/// panics on.
pub fn check(target: &str, what: &str, body: fn(&[u8]), input: &[u8]) {
    if let Err(panic) = catch_unwind(|| body(input)) {
        let mut h = DefaultHasher::new();
        input.hash(&mut h);
        let dir = std::env::temp_dir().join("fuzz-props");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{target}-{:016x}", h.finish()));
        let _ = std::fs::write(&path, input);
        eprintln!(
            "{target}: {what} failed; its input ({} bytes) is in {}",
            input.len(),
            path.display()
        );
        resume_unwind(panic);
    }
}

/// The property test of one target: every corpus file, then `cases`
/// random inputs: a third from `generate`, a third mutated corpus
/// entries, a third mutated generated ones.
pub fn run(
    target: &str,
    default_cases: usize,
    body: fn(&[u8]),
    mut generate: impl FnMut(&mut StdRng) -> Vec<u8>,
) {
    let corpus = corpus(target);
    for (name, input) in &corpus {
        check(target, &format!("corpus file {name}"), body, input);
    }
    let pool: Vec<Vec<u8>> = corpus.into_iter().map(|(_, bytes)| bytes).collect();
    let (mut rng, seed) = rng(target);
    let cases = cases(default_cases);
    for case in 0..cases {
        let input = match case % 3 {
            0 => generate(&mut rng),
            1 => {
                let mut input = pool[rng.gen_range(0..pool.len())].clone();
                mutate(&mut rng, &mut input, &pool);
                input
            }
            _ => {
                let mut input = generate(&mut rng);
                mutate(&mut rng, &mut input, &pool);
                input
            }
        };
        check(
            target,
            &format!("random case {case} (FUZZ_SEED={seed})"),
            body,
            &input,
        );
    }
}
