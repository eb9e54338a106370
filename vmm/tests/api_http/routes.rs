//! The router serves exactly `api::routes::ROUTES` (which `api`'s tests
//! hold equal to `openapi.yaml`): each listed method reaches its handler,
//! every other method is 405 with the route's `Allow`.

use std::time::Duration;

use api::routes::ROUTES;
use api::ErrorCode;
use hyper::Method;

use crate::error_code;
use crate::fake::{Harness, Settle};

#[test]
fn router_serves_exactly_the_route_table() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    let op = c.add_vcpu(1, None).unwrap().operation().id;
    let methods = [
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ];
    for route in ROUTES {
        let id = if route.template.contains("operations") {
            op.to_string()
        } else {
            "3".into()
        };
        let path = route.template.replace("{id}", &id);
        for method in &methods {
            let body = (method == Method::PUT && !route.template.contains("{id}"))
                .then(|| ("application/json", br#"{"desired": 2}"#.to_vec()));
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
