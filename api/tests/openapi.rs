//! `openapi.yaml` parses, lists exactly the routes in `api::routes::ROUTES`
//! (which the server's router serves; vmm's `api_http` tests check that over
//! HTTP), and its schemas match what the Rust types put on the wire.

use std::collections::BTreeSet;

use api::routes::ROUTES;
use api::{
    ApiError, CpuWork, ErrorBody, ErrorCode, FaultInjected, FaultKind, FaultRequest, FaultTarget,
    GuestWorker, GuestWorkers, Operation, OperationKind, OperationStatus, ResizeRequest, VcpuInfo,
    VcpuList, VcpuState, VmInfo, VmState, WorkloadInfo, WorkloadState,
};
use serde::Serialize;
use yaml_rust2::{Yaml, YamlLoader};

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn spec() -> Yaml {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("read openapi.yaml");
    let mut docs = YamlLoader::load_from_str(&text).expect("openapi.yaml is valid YAML");
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

fn keys(yaml: &Yaml) -> BTreeSet<String> {
    yaml.as_hash()
        .map(|h| {
            h.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn strings(yaml: &Yaml) -> BTreeSet<String> {
    yaml.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn spec_lists_exactly_the_served_routes() {
    let spec = spec();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let paths = &spec["paths"];
    let spec_paths = keys(paths);
    let served: BTreeSet<String> = ROUTES.iter().map(|r| r.template.to_owned()).collect();
    assert_eq!(spec_paths, served);
    for route in ROUTES {
        let item = &paths[route.template];
        let spec_methods: BTreeSet<String> = keys(item)
            .into_iter()
            .filter(|k| METHODS.contains(&k.as_str()))
            .collect();
        let served: BTreeSet<String> = route.methods.iter().map(|m| m.to_lowercase()).collect();
        assert_eq!(spec_methods, served, "{}", route.template);
        // Test hooks are marked, and document the 404 a VMM without
        // `--test-hooks` answers.
        assert_eq!(
            item["x-test-only"].as_bool().unwrap_or(false),
            route.test_only,
            "x-test-only of {}",
            route.template
        );
        if route.test_only {
            for method in &spec_methods {
                assert!(
                    keys(&item[method.as_str()]["responses"]).contains("404"),
                    "{method} {}",
                    route.template
                );
            }
        }
        for method in &spec_methods {
            let responses = keys(&item[method.as_str()]["responses"]);
            assert!(
                responses.iter().any(|s| s.starts_with('2')),
                "{method} {}",
                route.template
            );
        }
    }
}

fn all_refs(yaml: &Yaml, out: &mut Vec<String>) {
    match yaml {
        Yaml::Hash(h) => {
            for (k, v) in h {
                if k.as_str() == Some("$ref") {
                    out.push(v.as_str().unwrap_or_default().to_owned());
                }
                all_refs(v, out);
            }
        }
        Yaml::Array(a) => a.iter().for_each(|v| all_refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_reference_resolves() {
    let spec = spec();
    let mut refs = Vec::new();
    all_refs(&spec, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let mut node = &spec;
        for part in r.strip_prefix("#/").expect("local reference").split('/') {
            node = &node[part];
        }
        assert!(!node.is_badvalue(), "unresolved {r}");
    }
}

fn schema<'a>(spec: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &spec["components"]["schemas"][name];
    assert!(!s.is_badvalue(), "no schema {name}");
    s
}

fn json_keys<T: Serialize>(value: &T) -> BTreeSet<String> {
    match serde_json::to_value(value).unwrap() {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

/// `full` (every optional field set) gives the properties, `minimal`
/// (every optional field unset) the required ones.
fn check_object<T: Serialize>(spec: &Yaml, name: &str, full: &T, minimal: &T) {
    let s = schema(spec, name);
    assert_eq!(s["additionalProperties"].as_bool(), Some(false), "{name}");
    assert_eq!(keys(&s["properties"]), json_keys(full), "{name} properties");
    assert_eq!(
        strings(&s["required"]),
        json_keys(minimal),
        "{name} required"
    );
}

fn check_enum<T: Serialize>(spec: &Yaml, name: &str, variants: &[T]) {
    let wire: BTreeSet<String> = variants
        .iter()
        .map(|v| {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(strings(&schema(spec, name)["enum"]), wire, "{name}");
}

#[test]
fn schemas_match_the_types() {
    let spec = spec();
    let vm = VmInfo {
        state: VmState::Running,
        boot_vcpus: 1,
        max_vcpus: 2,
        present_vcpus: 1,
        memory_mib: 64,
        agent_connected: Some(true),
        agent_version: Some("1".into()),
        workload: None,
    };
    let workload = WorkloadInfo {
        state: WorkloadState::Exited,
        pid: Some(97),
        exit_status: Some(137),
        signal: Some(9),
        error: Some("x".into()),
        output_lines: 3,
    };
    let workload_min = WorkloadInfo {
        state: WorkloadState::Running,
        pid: None,
        exit_status: None,
        signal: None,
        error: None,
        output_lines: 0,
    };
    check_object(&spec, "WorkloadInfo", &workload, &workload_min);
    let workload_states: BTreeSet<String> =
        strings(&schema(&spec, "WorkloadInfo")["properties"]["state"]["enum"]);
    assert_eq!(
        workload_states,
        WorkloadState::ALL
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
    let vm_min = VmInfo {
        agent_connected: None,
        agent_version: None,
        ..vm.clone()
    };
    let vm = VmInfo {
        workload: Some(workload),
        ..vm
    };
    check_object(&spec, "VmInfo", &vm, &vm_min);
    let vm_states: BTreeSet<String> =
        strings(&schema(&spec, "VmInfo")["properties"]["state"]["enum"]);
    assert_eq!(
        vm_states,
        VmState::ALL
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );

    let worker = GuestWorker {
        descriptor: "ksoftirqd".into(),
        cpu: 1,
        status: "active".into(),
        last_cpu: Some(1),
        setup_calls: 1,
        park_calls: 0,
        unpark_calls: 0,
        thread_fn_calls: 5,
    };
    let worker_min = GuestWorker {
        last_cpu: None,
        ..worker.clone()
    };
    check_object(&spec, "GuestWorker", &worker, &worker_min);
    let vcpu = VcpuInfo {
        id: 1,
        state: VcpuState::Present,
        guest_online: Some(true),
        guest_cpu: Some(1),
        workers: Some(vec![worker.clone()]),
    };
    let vcpu_min = VcpuInfo {
        guest_online: None,
        guest_cpu: None,
        workers: None,
        ..vcpu.clone()
    };
    check_object(&spec, "VcpuInfo", &vcpu, &vcpu_min);
    let list = VcpuList {
        max_vcpus: 1,
        vcpus: vec![],
    };
    check_object(&spec, "VcpuList", &list, &list);
    let resize = ResizeRequest { desired: 1 };
    check_object(&spec, "ResizeRequest", &resize, &resize);

    let work = CpuWork {
        cpu: 0,
        items_done: 3,
    };
    check_object(&spec, "CpuWork", &work, &work);
    let workers = GuestWorkers {
        agent_connected: Some(true),
        agent_version: Some("1".into()),
        snapshot_age_ms: Some(2),
        workers: vec![worker],
        work: vec![work],
    };
    check_object(&spec, "GuestWorkers", &workers, &GuestWorkers::unknown());
    let fault = FaultRequest {
        fault: FaultKind::IgnoreRemoval,
        cpu: Some(1),
    };
    let fault_min = FaultRequest { cpu: None, ..fault };
    check_object(&spec, "FaultRequest", &fault, &fault_min);
    let injected = FaultInjected {
        fault: FaultKind::AgentSilence,
        cpu: Some(1),
        target: FaultTarget::Agent,
    };
    let injected_min = FaultInjected {
        cpu: None,
        ..injected
    };
    check_object(&spec, "FaultInjected", &injected, &injected_min);

    let op = Operation {
        id: 1,
        kind: OperationKind::Resize,
        desired: Some(2),
        vcpus: vec![1],
        status: OperationStatus::Failed,
        reason: Some("r".into()),
        started_unix_ms: 1,
        duration_ms: Some(1),
    };
    let op_min = Operation {
        desired: None,
        reason: None,
        duration_ms: None,
        ..op.clone()
    };
    check_object(&spec, "Operation", &op, &op_min);

    let err = ApiError::new(ErrorCode::Conflict, "m");
    check_object(&spec, "ApiError", &err, &err);
    let body = ErrorBody::from(err);
    check_object(&spec, "ErrorBody", &body, &body);

    check_enum(&spec, "VcpuState", &VcpuState::ALL);
    check_enum(&spec, "OperationKind", &OperationKind::ALL);
    check_enum(&spec, "OperationStatus", &OperationStatus::ALL);
    check_enum(&spec, "ErrorCode", &ErrorCode::ALL);
    check_enum(&spec, "FaultKind", &FaultKind::ALL);
    check_enum(&spec, "FaultTarget", &FaultTarget::ALL);
}

#[test]
fn every_error_status_is_documented_somewhere() {
    let spec = spec();
    let mut documented = BTreeSet::new();
    for route in ROUTES {
        for method in route.methods {
            let op = &spec["paths"][route.template][method.to_lowercase().as_str()];
            documented.extend(keys(&op["responses"]));
        }
    }
    for code in ErrorCode::ALL {
        let status = code.status().to_string();
        // 404 for unknown paths and 405 for wrong methods concern paths the
        // spec does not list as operations.
        if matches!(code, ErrorCode::NotFound | ErrorCode::MethodNotAllowed) {
            continue;
        }
        assert!(documented.contains(&status), "{code} ({status})");
    }
}
