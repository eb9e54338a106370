//! From an HTTP request to a response: match the path, check the method,
//! read the body by the request's deadline, let the resource's parser
//! build the control action, ask the VMM, and turn its reply into HTTP.
//! Every answer is counted by status.

use std::sync::Arc;
use std::time::Duration;

use api::routes::{self, Route, ROUTES};
use api::{ApiError, ErrorCode};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tokio::time::Instant;

use super::parse::{self, Parsed, RequestError, RequestParts};
use super::response::{self, Body, Wait};
use super::{guest, metrics, operations, test_hooks, vcpus, vm, ServerState};
use crate::control::{Action, ControlError, Query, Request as Control, Responder};

/// A path the API serves, with its id segment if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource<'a> {
    Vm,
    Vcpus,
    Vcpu(&'a str),
    Operation(&'a str),
    Metrics,
    GuestWorkers,
    TestFaults,
}

impl<'a> Resource<'a> {
    fn parse(path: &'a str) -> Option<Self> {
        let rest = path.strip_prefix(routes::PREFIX)?.strip_prefix('/')?;
        Some(match rest.split_once('/') {
            None => match rest {
                "vm" => Self::Vm,
                "vcpus" => Self::Vcpus,
                "metrics" => Self::Metrics,
                _ => return None,
            },
            Some((_, "")) => return None,
            Some((_, id)) if id.contains('/') => return None,
            Some(("guest", "workers")) => Self::GuestWorkers,
            Some(("test", "faults")) => Self::TestFaults,
            Some(("vcpus", id)) => Self::Vcpu(id),
            Some(("operations", id)) => Self::Operation(id),
            Some(_) => return None,
        })
    }

    /// The entry of [`ROUTES`] this resource serves.
    fn route(self) -> Option<&'static Route> {
        let template = match self {
            Self::Vm => routes::VM,
            Self::Vcpus => routes::VCPUS,
            Self::Vcpu(_) => "/api/v1/vcpus/{id}",
            Self::Operation(_) => "/api/v1/operations/{id}",
            Self::Metrics => routes::METRICS,
            Self::GuestWorkers => routes::GUEST_WORKERS,
            Self::TestFaults => routes::TEST_FAULTS,
        };
        ROUTES.iter().find(|r| r.template == template)
    }
}

/// Answer one request whose body must be in by `deadline`; never panics
/// on client input. A body that is late is answered `408` and the
/// connection closed.
pub(super) async fn handle(
    state: &ServerState,
    request: Request<Incoming>,
    deadline: Instant,
) -> Response<Body> {
    let response = match answer(state, request, deadline).await {
        Ok(response) => response,
        Err(e) => match &e {
            RequestError::MethodNotAllowed { allow, .. } => {
                response::not_allowed(&e.to_api_error(), allow)
            }
            RequestError::Timeout(_) => {
                let mut response = response::error(&e.to_api_error());
                response::close_after(&mut response);
                response
            }
            _ => response::error(&e.to_api_error()),
        },
    };
    state.metrics.count(response.status().as_u16());
    response
}

async fn answer(
    state: &ServerState,
    request: Request<Incoming>,
    deadline: Instant,
) -> Result<Response<Body>, RequestError> {
    let (head, body) = request.into_parts();
    let resource = match resource(state, head.uri.path(), &head.method) {
        Ok(resource) => resource,
        Err(e) => {
            // Read what the client is sending (bounded) before answering,
            // so that it sees the answer rather than a closed connection.
            parse::discard_body(&head.headers, body, deadline).await;
            return Err(e);
        }
    };
    let timeout = state.options.request_timeout;
    let parts = RequestParts {
        query: head.uri.query().map(str::to_owned),
        content_type: parse::content_type(&head.headers),
        body: parse::read_body(&head.headers, body, deadline, timeout).await?,
    };
    let parsed = parse_request(resource, &head.method, &parts)?;
    Ok(dispatch(state, parsed).await)
}

/// The resource `path` names, if it serves `method`; test hooks are
/// unknown paths unless the server runs with them.
fn resource<'a>(
    state: &ServerState,
    path: &'a str,
    method: &Method,
) -> Result<Resource<'a>, RequestError> {
    let unknown = || RequestError::UnknownPath(path.to_owned());
    let resource = Resource::parse(path).ok_or_else(unknown)?;
    let route = resource.route().ok_or_else(unknown)?;
    if route.test_only && !state.options.test_hooks {
        return Err(unknown());
    }
    if !route.methods.contains(&method.as_str()) {
        return Err(RequestError::MethodNotAllowed {
            method: method.clone(),
            allow: route.methods,
        });
    }
    Ok(resource)
}

/// The resource's parser for `method` (already checked against the route).
fn parse_request(
    resource: Resource<'_>,
    method: &Method,
    parts: &RequestParts,
) -> Result<Parsed, RequestError> {
    match (resource, method) {
        (Resource::Vm, &Method::GET) => vm::parse_get(parts),
        (Resource::Vcpus, &Method::GET) => vcpus::parse_get(parts),
        (Resource::Vcpus, &Method::PUT) => vcpus::parse_resize(parts),
        (Resource::Vcpu(id), &Method::PUT) => vcpus::parse_add(id, parts),
        (Resource::Vcpu(id), &Method::DELETE) => vcpus::parse_remove(id, parts),
        (Resource::Operation(id), &Method::GET) => operations::parse_get(id, parts),
        (Resource::Metrics, &Method::GET) => metrics::parse_get(parts),
        (Resource::GuestWorkers, &Method::GET) => guest::parse_workers(parts),
        (Resource::TestFaults, &Method::POST) => test_hooks::parse_fault(parts),
        _ => Err(RequestError::MethodNotAllowed {
            method: method.clone(),
            allow: resource.route().map_or(&[], |r| r.methods),
        }),
    }
}

/// Ask the VMM and turn its answer into HTTP. Each request carries a
/// reply sender of exactly its answer's type.
async fn dispatch(state: &ServerState, parsed: Parsed) -> Response<Body> {
    let answer = match parsed.action {
        Action::GetVm => ask(state, |r| Control::Query(Query::Vm(r)))
            .await
            .map(|vm| response::json(200, &vm)),
        Action::GetVcpus => ask(state, |r| Control::Query(Query::Vcpus(r)))
            .await
            .map(|list| response::json(200, &list)),
        Action::GetWorkers => ask(state, |r| Control::Query(Query::Workers(r)))
            .await
            .map(|workers| response::json(200, &workers)),
        Action::GetMetrics => ask(state, |r| Control::Query(Query::Metrics(r)))
            .await
            .map(|vmm| {
                response::with_body(
                    200,
                    metrics::PROMETHEUS_CONTENT_TYPE,
                    state.metrics.render(&vmm).into_bytes(),
                )
            }),
        Action::GetOperation(id) => {
            match ask(state, |reply| {
                Control::Query(Query::Operation { id, reply })
            })
            .await
            {
                Ok(Some(op)) => Ok(response::json(200, &op)),
                Ok(None) => Err(ApiError::new(
                    ErrorCode::OperationNotFound,
                    format!("no operation {id}"),
                )),
                Err(e) => Err(e),
            }
        }
        Action::InjectFault { fault, cpu } => {
            ask(state, |reply| Control::InjectFault { fault, cpu, reply })
                .await
                .and_then(|r| r)
                .map(|injected| response::json(200, &injected))
        }
        Action::Resize { .. } | Action::AddVcpu(_) | Action::RemoveVcpu(_) => {
            let Some(change) = parsed.action.change() else {
                return response::error(&ApiError::new(ErrorCode::Internal, "not a change"));
            };
            let wait = waiter(state, parsed.wait);
            match ask(state, |reply| Control::Mutate { change, reply })
                .await
                .and_then(|r| r)
            {
                Ok(mutation) => return response::mutation(mutation, wait).await,
                Err(e) => Err(e),
            }
        }
    };
    answer.unwrap_or_else(|e| response::error(&e))
}

/// A waiter permit for `wait`, if one is left; else the answer does not
/// wait (`202`), and that is counted.
fn waiter(state: &ServerState, wait: Option<Duration>) -> Wait {
    let Some(wait) = wait else {
        return Wait::No;
    };
    match Arc::clone(&state.waiters).try_acquire_owned() {
        Ok(permit) => Wait::For(wait, permit),
        Err(_) => {
            state.metrics.count_wait_over_limit();
            Wait::No
        }
    }
}

async fn ask<T>(
    state: &ServerState,
    make: impl FnOnce(Responder<T>) -> Control,
) -> Result<T, ApiError> {
    let timeout = state.options.reply_timeout;
    let unavailable = |why: &str| ApiError::new(ErrorCode::Unavailable, why);
    match tokio::time::timeout(timeout, state.control.ask(make)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(ControlError::NoReply)) => Err(ApiError::new(
            ErrorCode::Internal,
            "the VMM dropped the request without answering",
        )),
        Ok(Err(e)) => {
            log::warn!("cannot pass an API request to the VMM: {e}");
            Err(unavailable("the VMM is not running"))
        }
        Err(_) => Err(unavailable(&format!(
            "the VMM did not answer within {}",
            seconds(timeout)
        ))),
    }
}

fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(Resource::parse("/api/v1/vm"), Some(Resource::Vm));
        assert_eq!(Resource::parse("/api/v1/vcpus"), Some(Resource::Vcpus));
        assert_eq!(
            Resource::parse("/api/v1/vcpus/3"),
            Some(Resource::Vcpu("3"))
        );
        assert_eq!(
            Resource::parse("/api/v1/operations/x"),
            Some(Resource::Operation("x"))
        );
        assert_eq!(Resource::parse("/api/v1/metrics"), Some(Resource::Metrics));
        assert_eq!(
            Resource::parse("/api/v1/guest/workers"),
            Some(Resource::GuestWorkers)
        );
        assert_eq!(
            Resource::parse("/api/v1/test/faults"),
            Some(Resource::TestFaults)
        );
        for bad in [
            "/",
            "/api/v1",
            "/api/v1/",
            "/api/v1/vm/",
            "/api/v1/vcpus/",
            "/api/v1/vcpus/1/2",
            "/api/v1/vm/1",
            "/api/v2/vm",
            "/api/v1/vmx",
            "/api/v1/guest",
            "/api/v1/guest/",
            "/api/v1/guest/x",
            "/api/v1/guest/workers/1",
            "/api/v1/test/faults/",
            "/api/v1/test/other",
        ] {
            assert_eq!(Resource::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_resource_has_a_route() {
        for r in [
            Resource::Vm,
            Resource::Vcpus,
            Resource::Vcpu("1"),
            Resource::Operation("1"),
            Resource::Metrics,
            Resource::GuestWorkers,
            Resource::TestFaults,
        ] {
            assert!(r.route().is_some(), "{r:?}");
        }
    }

    #[test]
    fn every_route_method_has_a_parser() {
        let parts = RequestParts::default();
        for route in ROUTES {
            let path = route.template.replace("{id}", "1");
            let resource = Resource::parse(&path).unwrap();
            for method in route.methods {
                let method = Method::from_bytes(method.as_bytes()).unwrap();
                let result = parse_request(resource, &method, &parts);
                assert!(
                    !matches!(result, Err(RequestError::MethodNotAllowed { .. })),
                    "{method} {path}"
                );
            }
        }
    }
}
