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
}

/// Every route the server serves: nothing more, nothing less.
pub const ROUTES: &[Route] = &[
    Route {
        template: VM,
        methods: &["GET"],
    },
    Route {
        template: VCPUS,
        methods: &["GET", "PUT"],
    },
    Route {
        template: "/api/v1/vcpus/{id}",
        methods: &["PUT", "DELETE"],
    },
    Route {
        template: "/api/v1/operations/{id}",
        methods: &["GET"],
    },
    Route {
        template: METRICS,
        methods: &["GET"],
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
}
