//! The router serves exactly `api::routes::ROUTES` (which `api`'s tests
//! hold equal to `openapi.yaml`): each listed method reaches its handler,
//! every other method is 405 with the route's `Allow`; without test hooks
//! the test-only routes are 404 to every method, like unknown paths.

use std::time::Duration;

use api::routes::{self, ROUTES};
use api::ErrorCode;
use hyper::Method;

use crate::error_code;

const METHODS: [Method; 6] = [
    Method::GET,
    Method::PUT,
    Method::POST,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
];
use crate::fake::{Harness, Settle};

#[test]
fn router_serves_exactly_the_route_table() {
    let h = Harness::start_with_hooks(Settle::After(Duration::ZERO));
    let c = h.blocking();
    let op = c.add_vcpu(1, None).unwrap().operation().id;
    for route in ROUTES {
        let id = if route.template.contains("operations") {
            op.to_string()
        } else {
            "3".into()
        };
        let path = route.template.replace("{id}", &id);
        for method in &METHODS {
            let body = if route.template == routes::TEST_FAULTS {
                Some(br#"{"fault": "ignore_removal", "cpu": 3}"#.to_vec())
            } else {
                (method == Method::PUT && !route.template.contains("{id}"))
                    .then(|| br#"{"desired": 2}"#.to_vec())
            };
            let body = body.map(|b| ("application/json", b));
            let r = c.request(method.clone(), &path, body).unwrap();
            if route.methods.contains(&method.as_str()) {
                // Reached its handler: anything but "no such path/method"
                // (a 409 is possible when the previous method's change is
                // still in flight) and never a server error.
                assert!(
                    r.status != 405 && r.status < 500,
                    "{method} {path}: {}",
                    r.text()
                );
                if r.status == 404 {
                    assert_ne!(error_code(&r), ErrorCode::NotFound, "{method} {path}");
                }
            } else {
                assert_eq!(r.status, 405, "{method} {path}");
                assert_eq!(r.header("allow"), Some(route.methods.join(", ").as_str()));
                assert_eq!(error_code(&r), ErrorCode::MethodNotAllowed);
            }
        }
    }
}

#[test]
fn test_routes_are_unknown_paths_without_hooks() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    let test_routes: Vec<_> = ROUTES.iter().filter(|r| r.test_only).collect();
    assert!(!test_routes.is_empty());
    for route in test_routes {
        for method in &METHODS {
            let body = Some((
                "application/json",
                br#"{"fault": "agent_silence"}"#.to_vec(),
            ));
            let r = c.request(method.clone(), route.template, body).unwrap();
            assert_eq!(
                (r.status, error_code(&r)),
                (404, ErrorCode::NotFound),
                "{method} {}",
                route.template
            );
            assert_eq!(r.header("allow"), None);
        }
    }
    // The VMM side refuses too (defence in depth), and nothing was armed.
    assert!(h.fake.lock().faults.is_empty());
}
