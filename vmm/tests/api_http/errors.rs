//! Every error status, through real HTTP.

use std::time::Duration;

use api::client::BlockingClient;
use api::ErrorCode;
use hyper::Method;
use vmm::api_server::ServerOptions;

use crate::error_code;
use crate::fake::{Harness, Settle, BOOT, MAX};

const JSON: &str = "application/json";

fn put_vcpus(c: &BlockingClient, query: &str, content_type: &str, body: &[u8]) -> (u16, ErrorCode) {
    let r = c
        .request(
            Method::PUT,
            &format!("/api/v1/vcpus{query}"),
            Some((content_type, body.to_vec())),
        )
        .unwrap();
    let code = error_code(&r);
    (r.status, code)
}

#[test]
fn malformed_bodies_and_values_are_400() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    let bad_bodies: [&[u8]; 11] = [
        b"{",
        b"not json",
        br#"{"desired": "3"}"#,
        br#"{"desired": -1}"#,
        br#"{"desired": 2.5}"#,
        br#"{"desired": null}"#,
        br#"{"desired": 4294967296}"#,
        br#"{"desired": 3, "extra": true}"#,
        br#"{}"#,
        br#"[3]"#,
        b"",
    ];
    for body in bad_bodies {
        let (status, code) = put_vcpus(&c, "", JSON, body);
        assert_eq!(
            (status, code),
            (400, ErrorCode::MalformedRequest),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let r = c
        .request(
            Method::PUT,
            "/api/v1/vcpus",
            Some((JSON, br#"{"desired": 3, "x": 1}"#.to_vec())),
        )
        .unwrap();
    assert!(r.text().contains("unknown field `x`"), "{}", r.text());
    for query in [
        "?wait=abc",
        "?wait=-1",
        "?wait=NaN",
        "?wait=100000",
        "?wait=1&wait=2",
        "?other=1",
    ] {
        let (status, _) = put_vcpus(&c, query, JSON, br#"{"desired": 3}"#);
        assert_eq!(status, 400, "{query}");
    }
    for (method, path) in [
        (Method::GET, "/api/v1/vm?x=1"),
        (Method::GET, "/api/v1/vcpus?wait=1"),
        (Method::PUT, "/api/v1/vcpus/abc"),
        (Method::PUT, "/api/v1/vcpus/-1"),
        (Method::DELETE, "/api/v1/vcpus/1.0"),
        (Method::PUT, "/api/v1/vcpus/99999999999"),
        (Method::GET, "/api/v1/operations/x"),
    ] {
        let r = c.request(method.clone(), path, None).unwrap();
        assert_eq!(
            (r.status, error_code(&r)),
            (400, ErrorCode::MalformedRequest),
            "{method} {path}"
        );
    }
    // A body where none is taken.
    let r = c
        .request(
            Method::DELETE,
            "/api/v1/vcpus/1",
            Some((JSON, b"{}".to_vec())),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    // Nothing changed through all that.
    assert_eq!(
        c.vcpus().unwrap().count(api::VcpuState::Present),
        BOOT as usize
    );
}

#[test]
fn unknown_things_are_404() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    for path in [
        "/",
        "/api",
        "/api/v1",
        "/api/v1/",
        "/api/v1/nope",
        "/api/v1/vm/",
        "/api/v1/vcpus/1/x",
        "/api/v2/vm",
    ] {
        let r = c.request(Method::GET, path, None).unwrap();
        assert_eq!(
            (r.status, error_code(&r)),
            (404, ErrorCode::NotFound),
            "{path}"
        );
    }
    for (method, id) in [
        (Method::PUT, MAX),
        (Method::DELETE, MAX),
        (Method::PUT, 4_000_000_000),
    ] {
        let r = c.request(method, &api::routes::vcpu(id), None).unwrap();
        assert_eq!(
            (r.status, error_code(&r)),
            (404, ErrorCode::VcpuNotFound),
            "{id}"
        );
    }
    let r = c
        .request(Method::GET, "/api/v1/operations/12345", None)
        .unwrap();
    assert_eq!(
        (r.status, error_code(&r)),
        (404, ErrorCode::OperationNotFound)
    );
}

#[test]
fn wrong_methods_are_405_with_allow() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    for (method, path, allow) in [
        (Method::POST, "/api/v1/vm", "GET"),
        (Method::DELETE, "/api/v1/vcpus", "GET, PUT"),
        (Method::PATCH, "/api/v1/vcpus", "GET, PUT"),
        (Method::GET, "/api/v1/vcpus/1", "PUT, DELETE"),
        (Method::POST, "/api/v1/vcpus/1", "PUT, DELETE"),
        (Method::DELETE, "/api/v1/operations/1", "GET"),
        (Method::PUT, "/api/v1/metrics", "GET"),
        (Method::HEAD, "/api/v1/vm", "GET"),
    ] {
        let r = c.request(method.clone(), path, None).unwrap();
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
        if method != Method::HEAD {
            assert_eq!(error_code(&r), ErrorCode::MethodNotAllowed);
        }
    }
}

#[test]
fn conflicts_are_409() {
    let h = Harness::start(Settle::Never);
    let c = h.blocking();
    let r = c.request(Method::DELETE, "/api/v1/vcpus/0", None).unwrap();
    assert_eq!(
        (r.status, error_code(&r)),
        (409, ErrorCode::Vcpu0NotRemovable)
    );
    // Removal of 1 in flight: adding it back conflicts, so does a resize
    // that needs its slot.
    assert_eq!(
        c.request(Method::DELETE, "/api/v1/vcpus/1", None)
            .unwrap()
            .status,
        202
    );
    let r = c.request(Method::PUT, "/api/v1/vcpus/1", None).unwrap();
    assert_eq!((r.status, error_code(&r)), (409, ErrorCode::Conflict));
    assert!(r.text().contains("vCPU 1 is being removed"), "{}", r.text());
    let (status, code) = put_vcpus(&c, "", JSON, format!(r#"{{"desired": {MAX}}}"#).as_bytes());
    assert_eq!((status, code), (409, ErrorCode::Conflict));
    // Add of 5 in flight: removing it conflicts.
    assert_eq!(
        c.request(Method::PUT, "/api/v1/vcpus/5", None)
            .unwrap()
            .status,
        202
    );
    let r = c.request(Method::DELETE, "/api/v1/vcpus/5", None).unwrap();
    assert_eq!((r.status, error_code(&r)), (409, ErrorCode::Conflict));
    // Once the guest has settled, both work.
    h.fake.settle_all();
    h.set_settle(Settle::After(Duration::ZERO));
    assert_eq!(
        c.request(Method::DELETE, "/api/v1/vcpus/5", None)
            .unwrap()
            .status,
        202
    );
    assert_eq!(
        c.request(Method::PUT, "/api/v1/vcpus/1", None)
            .unwrap()
            .status,
        202
    );
}

#[test]
fn oversized_body_is_413() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    let limit = api::routes::MAX_BODY_BYTES;
    // Exactly at the cap, padded with whitespace: accepted.
    let mut body = br#"{"desired": 3}"#.to_vec();
    body.resize(limit, b' ');
    let r = c
        .request(Method::PUT, "/api/v1/vcpus", Some((JSON, body.clone())))
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    body.push(b' ');
    let (status, code) = put_vcpus(&c, "", JSON, &body);
    assert_eq!((status, code), (413, ErrorCode::PayloadTooLarge));
    // Up to 1 MiB is read and thrown away, so the client gets its 413.
    let big = vec![b' '; 1 << 20];
    assert_eq!(put_vcpus(&c, "", JSON, &big).0, 413);
    // Beyond that the server answers 413 at once and closes: the client
    // sees the answer or, if still writing, a broken connection.
    let huge = vec![b' '; 8 << 20];
    match c.request(Method::PUT, "/api/v1/vcpus", Some((JSON, huge))) {
        Ok(r) => assert_eq!(r.status, 413),
        Err(api::client::ClientError::Http(_)) => {}
        Err(e) => panic!("{e}"),
    }
    // The server is still fine.
    assert_eq!(c.vcpus().unwrap().vcpus.len(), MAX as usize);
}

#[test]
fn non_json_content_type_is_415() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
    ] {
        let (status, code) = put_vcpus(&c, "", content_type, br#"{"desired": 3}"#);
        assert_eq!(
            (status, code),
            (415, ErrorCode::UnsupportedMediaType),
            "{content_type}"
        );
    }
    let r = c
        .request(
            Method::PUT,
            "/api/v1/vcpus",
            Some((
                "application/json; charset=utf-8",
                br#"{"desired": 2}"#.to_vec(),
            )),
        )
        .unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn bad_counts_are_422() {
    let h = Harness::start(Settle::After(Duration::ZERO));
    let c = h.blocking();
    for desired in [0, MAX + 1, u32::MAX] {
        let (status, code) = put_vcpus(
            &c,
            "",
            JSON,
            format!(r#"{{"desired": {desired}}}"#).as_bytes(),
        );
        assert_eq!(
            (status, code),
            (422, ErrorCode::InvalidVcpuCount),
            "{desired}"
        );
    }
    let err = c.resize(0, None).unwrap_err();
    assert!(err.to_string().contains("invalid_vcpu_count"), "{err}");
}

#[test]
fn vmm_failures_are_500_and_503() {
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let mut h = Harness::start_with(MAX, BOOT, Settle::After(Duration::ZERO), options);
    let c = h.blocking();
    // The VMM drops the request without answering.
    h.fake.lock().drop_requests = true;
    let r = c.request(Method::GET, "/api/v1/vm", None).unwrap();
    assert_eq!((r.status, error_code(&r)), (500, ErrorCode::Internal));
    // The VMM is too slow.
    {
        let mut state = h.fake.lock();
        state.drop_requests = false;
        state.reply_delay = Duration::from_millis(600);
    }
    let r = c.request(Method::GET, "/api/v1/vcpus", None).unwrap();
    assert_eq!((r.status, error_code(&r)), (503, ErrorCode::Unavailable));
    // The VMM is gone.
    h.fake.stop();
    let r = c.request(Method::PUT, "/api/v1/vcpus/3", None).unwrap();
    assert_eq!((r.status, error_code(&r)), (503, ErrorCode::Unavailable));
    assert!(r.text().contains("not running"), "{}", r.text());
}
