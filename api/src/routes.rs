//! The paths the API serves, shared by the server's router, the client and
//! the test that checks `openapi.yaml` against both.

/// Prefix of every path.
pub const PREFIX: &str = "/api/v1";
/// `GET`: the VM.
pub const VM: &str = "/api/v1/vm";
/// `GET`: every vCPU; `PUT`: resize.
pub const VCPUS: &str = "/api/v1/vcpus";
/// `GET`: the metrics in Prometheus text format.
pub const METRICS: &str = "/api/v1/metrics";
/// `GET`: the guest agent's worker threads and work counters.
pub const GUEST_WORKERS: &str = "/api/v1/guest/workers";
/// `POST`: inject a fault (test hook, see [`Route::test_only`]).
pub const TEST_FAULTS: &str = "/api/v1/test/faults";

/// Largest request body the server accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest `?wait=SECONDS` the server accepts.
pub const MAX_WAIT_SECONDS: f64 = 3600.0;

/// One path template and the methods it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// OpenAPI-style template, e.g. `/api/v1/vcpus/{id}`.
    pub template: &'static str,
    /// Methods served, upper case, in the order the `Allow` header lists them.
    pub methods: &'static [&'static str],
    /// A test hook: served only when the VMM runs with `--test-hooks`,
    /// otherwise answered `404` like an unknown path (every method).
    /// `openapi.yaml` marks these paths with `x-test-only: true`.
    pub test_only: bool,
}

/// Every route the server serves: nothing more, nothing less.
pub const ROUTES: &[Route] = &[
    Route {
        template: VM,
        methods: &["GET"],
        test_only: false,
    },
    Route {
        template: VCPUS,
        methods: &["GET", "PUT"],
        test_only: false,
    },
    Route {
        template: "/api/v1/vcpus/{id}",
        methods: &["PUT", "DELETE"],
        test_only: false,
    },
    Route {
        template: "/api/v1/operations/{id}",
        methods: &["GET"],
        test_only: false,
    },
    Route {
        template: METRICS,
        methods: &["GET"],
        test_only: false,
    },
    Route {
        template: GUEST_WORKERS,
        methods: &["GET"],
        test_only: false,
    },
    Route {
        template: TEST_FAULTS,
        methods: &["POST"],
        test_only: true,
    },
];

/// `/api/v1/vcpus/{id}`.
pub fn vcpu(id: u32) -> String {
    format!("{VCPUS}/{id}")
}

/// `/api/v1/operations/{id}`.
pub fn operation(id: u64) -> String {
    format!("{PREFIX}/operations/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_match_templates() {
        assert_eq!(vcpu(3), ROUTES[2].template.replace("{id}", "3"));
        assert_eq!(operation(9), ROUTES[3].template.replace("{id}", "9"));
        assert!(ROUTES.iter().all(|r| r.template.starts_with(PREFIX)));
    }

    #[test]
    fn test_hooks_live_under_test() {
        for r in ROUTES {
            assert_eq!(
                r.test_only,
                r.template.starts_with("/api/v1/test/"),
                "{}",
                r.template
            );
        }
    }
}
