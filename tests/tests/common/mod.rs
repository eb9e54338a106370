//! The fake emulated host of the harness's own tests: `fake-qemu` (see
//! `src/bin/fake-qemu.rs`) playing a script instead of booting anything.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use e2e::emulated::{HostImage, QemuConfig};
use e2e::HostJob;

/// `testhost-init`'s ready line, as the fake prints it.
pub const READY: &str = "out: TESTHOST-READY init_ms=1 modules_ms=2 ready_ms=3";

/// A fake emulated host: `fake-qemu` playing a script.
pub struct Fake {
    /// Its scratch directory.
    pub dir: PathBuf,
    /// The script `fake-qemu` plays.
    pub script: PathBuf,
}

impl Fake {
    /// A fake named `name` playing `script`.
    pub fn new(name: &str, script: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("e2e-fake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("script");
        std::fs::write(&path, script).unwrap();
        Fake { dir, script: path }
    }

    /// Boots it with the echo-server job, no API socket.
    pub fn launch(&self) -> e2e::Result<e2e::RunningVm> {
        self.launch_with(None)
    }

    /// Boots it with the echo-server job.
    pub fn launch_with(&self, api_socket: Option<PathBuf>) -> e2e::Result<e2e::RunningVm> {
        let qemu = QemuConfig::new(PathBuf::from(env!("CARGO_BIN_EXE_fake-qemu")));
        let image = HostImage {
            kernel: self.script.clone(),
            modules: Vec::new(),
            init: self.script.clone(),
        };
        e2e::launch_host_job_on(
            qemu,
            image,
            HostJob::EchoServer,
            api_socket,
            Duration::from_secs(30),
        )
    }

    /// How many times QEMU was started.
    pub fn starts(&self) -> u32 {
        std::fs::read_to_string(self.script.with_extension("count"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
