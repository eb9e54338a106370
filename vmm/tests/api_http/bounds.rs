//! The server's bounds (`ServerOptions`), through real sockets: the
//! connection cap, the request deadline, the waiter cap, the
//! per-connection lifetime, and the errors hyper answers by itself.

use std::time::{Duration, Instant};

use api::client::{BlockingClient, ClientError, MutationOutcome};
use api::{ErrorCode, Operation, OperationStatus, VcpuState};
use vmm::api_server::ServerOptions;

use crate::fake::{Harness, Settle, BOOT, MAX};
use crate::raw::{self, closed_within, read_answer, send};

fn harness(settle: Settle, options: ServerOptions) -> Harness {
    Harness::start_with(MAX, BOOT, settle, options)
}

/// Wait (bounded) until `check` holds.
fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const PARTIAL_BODY: &[u8] = b"PUT /api/v1/vcpus HTTP/1.1\r\nHost: localhost\r\n\
    Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"desi";

#[test]
fn slow_clients_do_not_hold_the_server() {
    let options = ServerOptions {
        request_timeout: Duration::from_secs(2),
        ..ServerOptions::default()
    };
    assert_eq!(options.max_connections, 64);
    let h = harness(Settle::After(Duration::ZERO), options);
    let started = Instant::now();
    // 64 slow clients: silent, half a request line, or a body never
    // finished.
    let mut slow: Vec<_> = (0..64)
        .map(|i| {
            let mut s = raw::connect(&h.socket);
            match i % 3 {
                0 => {}
                1 => send(&mut s, b"GET /api/v1/vm HTTP/1.1\r\nHo"),
                _ => send(&mut s, PARTIAL_BODY),
            }
            (i, s)
        })
        .collect();

    // The 65th gets its answer within a second: the server is full, so
    // 503 with the JSON error, and the connection is closed.
    let t = Instant::now();
    let mut s = raw::connect(&h.socket);
    send(&mut s, &raw::get("/api/v1/metrics"));
    let answer = read_answer(&mut s).expect("an answer");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.error_code(), ErrorCode::Unavailable);
    assert!(
        answer.message().contains("connection limit"),
        "{}",
        answer.message()
    );
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(closed_within(&mut s, Duration::from_secs(2)).is_ok());
    // The client library sees the same.
    let t = Instant::now();
    match h.blocking().metrics() {
        Err(ClientError::Api { status: 503, error }) => {
            assert_eq!(error.code, ErrorCode::Unavailable);
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(h.metrics.refused_connections(), 2);

    // At the deadline every slow client is cut off: headers late, closed
    // without an answer; a body late, 408 and closed.
    for (i, s) in &mut slow {
        if *i % 3 == 2 {
            let answer = read_answer(s).expect("a 408");
            assert_eq!(answer.status, 408, "{answer:?}");
            assert_eq!(answer.error_code(), ErrorCode::RequestTimeout);
        }
        if let Err(got) = closed_within(s, Duration::from_secs(5)) {
            panic!("client {i} not cut off: {}", String::from_utf8_lossy(&got));
        }
    }
    let cut = started.elapsed();
    assert!(
        cut >= Duration::from_millis(1900) && cut < Duration::from_secs(6),
        "{cut:?}"
    );
    // Room again.
    let text = h.blocking().metrics().unwrap();
    assert!(
        text.contains("vmm_api_connections_refused_total 2\n"),
        "{text}"
    );
    assert!(
        text.contains("vmm_api_requests_total{status=\"408\"} 21\n"),
        "{text}"
    );
    // Nothing reached the VMM from the slow ones.
    assert_eq!(
        h.blocking().vcpus().unwrap().count(VcpuState::Present),
        BOOT as usize
    );
}

#[test]
fn a_body_that_never_finishes_is_cut_off_at_the_deadline() {
    let options = ServerOptions {
        request_timeout: Duration::from_millis(500),
        ..ServerOptions::default()
    };
    let h = harness(Settle::After(Duration::ZERO), options);
    let mut s = raw::connect(&h.socket);
    let t = Instant::now();
    send(&mut s, PARTIAL_BODY);
    let answer = read_answer(&mut s).expect("a 408");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(answer.status, 408);
    assert_eq!(answer.error_code(), ErrorCode::RequestTimeout);
    assert!(answer.message().contains("0.5 s"), "{}", answer.message());
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(closed_within(&mut s, Duration::from_secs(2)).is_ok());

    // Headers that never finish: closed at the deadline, no answer
    // (hyper's header timeout).
    let mut s = raw::connect(&h.socket);
    send(&mut s, b"GET /api/v1/vm HTTP/1.1\r\n");
    let took = closed_within(&mut s, Duration::from_secs(3)).expect("closed, no answer");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    // A keep-alive connection left idle is closed the same way.
    let mut s = raw::connect(&h.socket);
    send(&mut s, &raw::get("/api/v1/vm"));
    assert_eq!(read_answer(&mut s).unwrap().status, 200);
    assert!(closed_within(&mut s, Duration::from_secs(3)).is_ok());

    // A body declared over the cap is 413 whatever the deadline.
    let mut s = raw::connect(&h.socket);
    send(
        &mut s,
        b"PUT /api/v1/vcpus HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n{",
    );
    let answer = read_answer(&mut s).unwrap();
    assert_eq!(answer.error_code(), ErrorCode::PayloadTooLarge);

    // A body in two parts within the deadline is fine.
    let mut s = raw::connect(&h.socket);
    send(
        &mut s,
        b"PUT /api/v1/vcpus HTTP/1.1\r\nHost: localhost\r\nContent-Length: 14\r\n\r\n{\"desi",
    );
    std::thread::sleep(Duration::from_millis(100));
    send(&mut s, b"red\": 3}");
    assert_eq!(read_answer(&mut s).unwrap().status, 202);
    assert_eq!(h.metrics.requests(408), 1);
}

#[test]
fn waiters_beyond_the_cap_are_answered_at_once_with_202() {
    let options = ServerOptions {
        max_waiters: 2,
        ..ServerOptions::default()
    };
    let h = harness(Settle::Never, options);
    let waiting: Vec<_> = [2u32, 3]
        .into_iter()
        .map(|id| {
            let socket = h.socket.clone();
            std::thread::spawn(move || {
                BlockingClient::new(socket)
                    .unwrap()
                    .add_vcpu(id, Some(Duration::from_secs(30)))
            })
        })
        .collect();
    until("two waiters", || h.fake.lock().table.running().len() == 2);

    // The third waits for nothing: 202 with the operation, at once.
    let t = Instant::now();
    let mut s = raw::connect(&h.socket);
    send(
        &mut s,
        b"PUT /api/v1/vcpus/4?wait=30 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    );
    let answer = read_answer(&mut s).expect("an answer");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(answer.status, 202, "{answer:?}");
    let op: Operation = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        (op.vcpus.as_slice(), op.status),
        (&[4][..], OperationStatus::Running)
    );
    assert_eq!(
        answer.header("location"),
        Some(api::routes::operation(op.id).as_str())
    );
    assert_eq!(h.metrics.waits_over_limit(), 1);

    // The client library waits anyway, polling the operation.
    h.set_settle(Settle::After(Duration::from_millis(300)));
    let c = h.blocking();
    match c.add_vcpu(5, Some(Duration::from_secs(10))).unwrap() {
        MutationOutcome::Finished(op) => {
            assert_eq!(op.status, OperationStatus::Succeeded);
            assert_eq!(op.vcpus, [5]);
        }
        other => panic!("{other:?}"),
    }
    // ... and reports a wait that runs out as such.
    h.set_settle(Settle::Never);
    match c.add_vcpu(6, Some(Duration::from_millis(300))) {
        Err(ClientError::WaitTimedOut(op)) => assert_eq!(op.vcpus, [6]),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.metrics.waits_over_limit(), 3);

    // The waiters finish; their permits come back.
    h.fake.settle_all();
    for w in waiting {
        match w.join().unwrap().unwrap() {
            MutationOutcome::Finished(op) => assert_eq!(op.status, OperationStatus::Succeeded),
            other => panic!("{other:?}"),
        }
    }
    h.set_settle(Settle::After(Duration::from_millis(10)));
    let r = c
        .request(hyper::Method::DELETE, "/api/v1/vcpus/5?wait=5", None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.metrics.waits_over_limit(), 3);
}

#[test]
fn a_connection_serves_a_bounded_number_of_requests() {
    let options = ServerOptions {
        max_requests_per_connection: 3,
        ..ServerOptions::default()
    };
    let h = harness(Settle::After(Duration::ZERO), options);
    let mut s = raw::connect(&h.socket);
    for n in 1..=3 {
        send(&mut s, &raw::get("/api/v1/vm"));
        let answer = read_answer(&mut s).expect("an answer");
        assert_eq!(answer.status, 200);
        let close = answer.header("connection") == Some("close");
        assert_eq!(close, n == 3, "request {n}: {answer:?}");
    }
    assert!(closed_within(&mut s, Duration::from_secs(2)).is_ok());
}

#[test]
fn a_connection_lives_a_bounded_time() {
    let options = ServerOptions {
        max_connection_age: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let h = harness(Settle::After(Duration::from_millis(600)), options);
    // Idle past its age: closed.
    let mut s = raw::connect(&h.socket);
    send(&mut s, &raw::get("/api/v1/vm"));
    assert_eq!(read_answer(&mut s).unwrap().status, 200);
    let took = closed_within(&mut s, Duration::from_secs(3)).expect("closed");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // A wait in progress when the age runs out still gets its answer,
    // then the connection closes.
    let mut s = raw::connect(&h.socket);
    send(
        &mut s,
        b"PUT /api/v1/vcpus/3?wait=5 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    );
    let answer = read_answer(&mut s).expect("the wait's answer");
    assert_eq!(answer.status, 200, "{answer:?}");
    let op: Operation = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(op.status, OperationStatus::Succeeded);
    assert!(closed_within(&mut s, Duration::from_secs(3)).is_ok());
}

/// What hyper answers before the router sees a request. Two *different*
/// `Content-Length`s, an invalid one, or a malformed request line: hyper's
/// own `400`, with an empty body (its `http1::Builder` has no hook to give
/// it ours; documented), and the connection closed. Two *identical*
/// `Content-Length`s are merged into one by hyper (RFC 9110 allows it), so
/// the request is served normally, JSON errors included.
#[test]
fn errors_hyper_answers_itself() {
    let h = harness(Settle::After(Duration::ZERO), ServerOptions::default());
    for request in [
        &b"PUT /api/v1/vcpus HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
           Content-Length: 14\r\nContent-Length: 15\r\n\r\n{\"desired\": 3} "[..],
        b"PUT /api/v1/vcpus HTTP/1.1\r\nHost: localhost\r\nContent-Length: x\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ] {
        let mut s = raw::connect(&h.socket);
        send(&mut s, request);
        let answer = read_answer(&mut s).expect("an answer");
        let text = String::from_utf8_lossy(request);
        assert_eq!(answer.status, 400, "{text}: {answer:?}");
        assert!(answer.body.is_empty(), "{text}: {answer:?}");
        assert!(
            closed_within(&mut s, Duration::from_secs(2)).is_ok(),
            "{text}"
        );
    }
    // Identical duplicates: one length, the request served.
    let mut s = raw::connect(&h.socket);
    send(
        &mut s,
        b"PUT /api/v1/vcpus HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
          Content-Length: 14\r\nContent-Length: 14\r\n\r\n{\"desired\": 3}",
    );
    assert_eq!(read_answer(&mut s).unwrap().status, 202);
    // ... and errors past hyper are JSON as always.
    send(
        &mut s,
        b"PUT /api/v1/vcpus HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
          Content-Length: 3\r\nContent-Length: 3\r\n\r\n{x}",
    );
    let answer = read_answer(&mut s).unwrap();
    assert_eq!(answer.error_code(), ErrorCode::MalformedRequest);
    // None of hyper's answers reached the router's count.
    assert_eq!(h.metrics.requests(400), 1);
}
