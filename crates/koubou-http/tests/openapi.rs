//! The OpenAPI document (`koubou_http::openapi`) is exact: `docs/openapi.json` is what the code
//! serves, every route is in it, and every field a response always carries is `required`.
//! To update `docs/openapi.json` after changing a route or a type:
//! `KOUBOU_UPDATE_SCHEMA=1 cargo test -p koubou-http --test openapi`.

use std::collections::BTreeSet;

use koubou_api::{
    BackendView, CooldownView, HealthView, QueueView, SubmitResponse, SystemStatus, TaskList, TaskResult, TaskView,
    WorkerView, WorkersView,
};
use koubou_http::error::{ErrorBody, ErrorDetail};
use koubou_http::openapi;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

fn doc() -> Value {
    serde_json::from_str(openapi::json()).unwrap()
}

#[test]
fn published_document_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    if std::env::var_os("KOUBOU_UPDATE_SCHEMA").is_some() {
        std::fs::write(path, openapi::json()).unwrap();
    }
    let published = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        published == openapi::json(),
        "docs/openapi.json is out of date; regenerate with KOUBOU_UPDATE_SCHEMA=1 cargo test -p koubou-http --test openapi"
    );
    assert_eq!(doc()["openapi"], "3.1.0");
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let documented: BTreeSet<String> = doc()["paths"].as_object().unwrap().keys().cloned().collect();
    let served: BTreeSet<String> = koubou_http::rest::paths().into_iter().map(str::to_owned).collect();
    if let Some(p) = served.difference(&documented).next() {
        panic!(
            "route {p} is served but not in the OpenAPI document: give its handler a #[utoipa::path] and list it in openapi::Doc's paths (or, for an alias, in STATUS_ALIASES)"
        );
    }
    if let Some(p) = documented.difference(&served).next() {
        panic!(
            "the OpenAPI document has {p}, which the router does not serve: remove it or add the route to rest::routes"
        );
    }
}

#[test]
fn every_operation_documents_the_guard_and_json_errors() {
    let doc = doc();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            for status in ["401", "403", "408", "413", "429", "503"] {
                assert!(responses.contains_key(status), "{method} {path} does not document {status}");
            }
            for (status, r) in responses {
                if status.starts_with('2') {
                    continue;
                }
                let r = match r.get("$ref").and_then(Value::as_str) {
                    Some(name) => &doc["components"]["responses"][name.rsplit('/').next().unwrap()],
                    None => r,
                };
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ErrorBody",
                    "{method} {path} {status} is not the JSON error"
                );
            }
        }
    }
}

/// `T` read from `minimal` (its fields that have no default) and written again: the fields it
/// is always sent with, which its schema must call `required` — and no others.
fn required_is_what_is_always_sent<T: Serialize + DeserializeOwned>(name: &str, minimal: Value) {
    let value: T = serde_json::from_value(minimal).unwrap_or_else(|e| {
        panic!("{name}: {e}; a new field without a default must be added to this test's minimal {name}")
    });
    let sent: BTreeSet<String> = serde_json::to_value(&value).unwrap().as_object().unwrap().keys().cloned().collect();
    let schema = &doc()["components"]["schemas"][name];
    let required: BTreeSet<String> =
        schema["required"].as_array().into_iter().flatten().map(|v| v.as_str().unwrap().to_owned()).collect();
    if let Some(f) = sent.difference(&required).next() {
        panic!(
            "{name}.{f} is always sent but its schema does not require it: mark the field \
             #[schema(required = true)] (an Option sent as null, or a field with a serde default)"
        );
    }
    if let Some(f) = required.difference(&sent).next() {
        panic!("{name}.{f} is required by the schema but not always sent (skip_serializing_if?)");
    }
}

#[test]
fn response_schemas_require_exactly_what_is_always_sent() {
    let id = "0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60";
    let task = json!({"task_id": id, "type": "general", "status": "pending", "priority": 5, "prompt": "p",
        "attempts": 0, "max_attempts": 1, "created_at": "2026-01-01T00:00:00Z", "options": {}, "metadata": {}});
    required_is_what_is_always_sent::<TaskView>("TaskView", task.clone());
    required_is_what_is_always_sent::<TaskResult>("TaskResult", json!({"success": true, "output": ""}));
    required_is_what_is_always_sent::<SubmitResponse>(
        "SubmitResponse",
        json!({"task_id": id, "status": "delegated", "task_status": "pending", "created": true}),
    );
    required_is_what_is_always_sent::<TaskList>("TaskList", json!({"tasks": [], "total": 0}));
    required_is_what_is_always_sent::<WorkerView>(
        "WorkerView",
        json!({"worker_id": "n/1", "state": "idle", "tasks_done": 0, "tasks_failed": 0, "started_at": "t"}),
    );
    required_is_what_is_always_sent::<WorkersView>(
        "WorkersView",
        json!({"active": 1, "busy": 0, "min_workers": 1, "max_workers": 1, "backend_capacity": 1, "workers": []}),
    );
    let backend = json!({"name": "e", "kind": "echo", "up": true, "detail": "", "default_model": "m", "capacity": 1,
        "models": [], "serves": []});
    required_is_what_is_always_sent::<BackendView>("BackendView", backend);
    required_is_what_is_always_sent::<CooldownView>("CooldownView", json!({"until": "t", "reason": "r"}));
    let queue = json!({"pending": 0, "running": 0, "retrying": 0, "completed": 0, "failed": 0, "cancelled": 0});
    required_is_what_is_always_sent::<QueueView>("QueueView", queue.clone());
    required_is_what_is_always_sent::<HealthView>(
        "HealthView",
        json!({"status": "healthy", "version": "0", "queue": queue, "workers": 0, "backends": [], "routes": {}}),
    );
    required_is_what_is_always_sent::<SystemStatus>(
        "SystemStatus",
        json!({"active_workers": 0, "busy_workers": 0, "pending_tasks": 0, "running_tasks": 0, "completed_tasks": 0,
            "failed_tasks": 0, "cancelled_tasks": 0, "throughput_per_sec": 0.0, "tokens_per_sec": 0.0,
            "uptime_secs": 0, "rss_bytes": 0}),
    );
    required_is_what_is_always_sent::<koubou_task::Usage>("Usage", json!({"prompt_tokens": 1, "completion_tokens": 1}));
    required_is_what_is_always_sent::<ErrorBody>("ErrorBody", json!({"error": {"code": "c", "message": "m"}}));
    required_is_what_is_always_sent::<ErrorDetail>("ErrorDetail", json!({"code": "c", "message": "m"}));
}
