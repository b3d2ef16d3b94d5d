//! The REST API's OpenAPI 3.1 document, served at `GET /openapi.json` and kept in
//! `docs/openapi.json`.
//!
//! It is made from the code, so it cannot drift from it: each handler's `#[utoipa::path]` gives
//! its path, parameters and answers, and the shapes are the types the handlers send, which
//! derive their schemas (`utoipa::ToSchema`). What the code does not say itself is added here:
//! the aliases of `GET /task/{id}/status`, the refusals of the guard and the body limit that any
//! route may answer, and that a submission needs `prompt` or `content`.

use std::sync::LazyLock;

#[cfg(doc)]
use koubou_api::SubmitRequest;
use koubou_task::{GenOptions, Priority, TaskKind};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::{
    IntoResponses, Modify, OpenApi, PartialSchema, ToSchema,
    openapi::{
        self, AllOfBuilder, ContentBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Schema,
        header::HeaderBuilder,
        path::{Operation, PathItem},
        schema::AnyOfBuilder,
    },
};

use crate::{error::ErrorBody, rest};

/// The JSON body [`SubmitRequest::from_json`] reads (`POST /task/delegate`), as its schema in the
/// REST API's OpenAPI document: never built, it only describes. `prompt` or its alias `content`
/// is required (`prompt` wins when both are sent); `null` is the same as an absent field, except
/// for `prompt` and `content`; any other field is refused.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct SubmitBody {
    /// The task's type (default `general`); it must be configured on the server.
    #[serde(rename = "type")]
    kind: Option<TaskKind>,
    /// The text of the task.
    #[serde(default)]
    prompt: String,
    /// The prototype's name for `prompt`.
    #[serde(default)]
    content: String,
    /// Default 5.
    priority: Option<Priority>,
    /// A system prompt (else the one configured for the type).
    system: Option<String>,
    /// Pins the model (else the router's choice for the type).
    model: Option<String>,
    /// Pins the backend (else the router's choice for the type).
    backend: Option<String>,
    /// At most `limits.max_attempts_cap` (0 counts as 1).
    max_attempts: Option<u64>,
    /// At most `limits.max_timeout_secs`.
    timeout_secs: Option<u64>,
    /// A second submission with the same key returns the first task instead of a new one.
    idempotency_key: Option<String>,
    options: Option<GenOptions>,
    /// Free JSON kept with the task (at most `limits.max_metadata_bytes` serialized).
    metadata: Option<Map<String, Value>>,
    /// Labels, lower-cased and de-duplicated (at most 16); `confidential` keeps the task off
    /// remote backends whatever the routing. One string is one tag.
    tags: Option<SubmitTags>,
    /// Ask for a JSON answer; one that does not parse fails the attempt.
    json: Option<bool>,
    /// A JSON Schema the answer must follow (implies `json`).
    #[schema(value_type = Option<Object>)]
    schema: Option<Value>,
    /// Wait for the result and answer with it (bounded by `server.sync_wait_secs`).
    sync: Option<bool>,
    /// How long to wait when `sync` (default and bound: `server.sync_wait_secs`).
    wait_secs: Option<u64>,
}

/// `tags` in [`SubmitBody`]: one tag, or a list of them.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum SubmitTags {
    One(String),
    Many(Vec<String>),
}

/// Answers any route calling the system may give when the server, not the request, is at fault.
#[derive(IntoResponses)]
pub(crate) enum ServerTrouble {
    /// `internal`: the server's fault (e.g. the database could not be read).
    #[response(status = 500)]
    #[allow(dead_code)]
    Internal(ErrorBody),
    /// Not now: the server is shutting down (`unavailable`), the disk holding the queue is full
    /// (`disk_full`), another program holds the database (`database_locked`), or the port has
    /// `server.max_connections` open (`too_many_connections`); all but the first with
    /// `Retry-After`.
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds to wait before sending the request again.")))]
    #[allow(dead_code)]
    Unavailable(ErrorBody),
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Koubou REST API",
        description = "The REST face of Koubou's task queue (port 8765). Every error is JSON \
            `{\"error\": {\"code\", \"message\", \"field\"?, \"retry_after_secs\"?}}`. Requests must \
            carry a `Host` the server answers to and no foreign `Origin`; with `server.auth_token` \
            set, `Authorization: Bearer <token>`. See docs/rest.md.",
        license(name = "MIT"),
    ),
    paths(
        rest::delegate, rest::status, rest::events, rest::cancel, rest::list,
        rest::pending, rest::active, rest::completed,
        rest::workers, rest::nodes, rest::health, rest::system_status, rest::metrics, rest::system_info, rest::openapi_json,
    ),
    components(schemas(koubou_task::Event)),
    modifiers(&Aliases, &Guarded, &PromptRequired),
    tags(
        (name = "tasks", description = "Submitting, reading, following and cancelling tasks."),
        (name = "system", description = "Workers, health, status, metrics, this document."),
        (name = "prototype", description = "The prototype's routes, for its clients (docs/compat.md)."),
    ),
)]
struct Doc;

/// The other paths of `GET /task/{id}/status` (the prototype's clients use them).
pub const STATUS_ALIASES: &[&str] = &["/task/status/{id}", "/task/{id}"];

struct Aliases;

impl Modify for Aliases {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let item = doc.paths.paths.get("/task/{id}/status").cloned().expect("the status route is documented");
        for (i, alias) in STATUS_ALIASES.iter().enumerate() {
            let mut item: PathItem = item.clone();
            for op in operations(&mut item) {
                op.operation_id = op.operation_id.as_ref().map(|id| format!("{id}_alias{}", i + 1));
                op.summary = Some("A task (the same as GET /task/{id}/status).".into());
            }
            doc.paths.paths.insert((*alias).to_owned(), item);
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch].into_iter().flatten()
}

/// What the guard and the body limit answer, before any handler, on every route.
const REFUSALS: &[(&str, &str, &str, bool)] = &[
    ("400", "BadBody", "`invalid_request`: the request body could not be read (`field`: `body`).", false),
    ("401", "Unauthorized", "`unauthorized`: `server.auth_token` is set and the request has no valid token.", false),
    (
        "403",
        "Forbidden",
        "`forbidden_host`: the `Host` is not a name this server answers to (DNS rebinding); \
         `forbidden_origin`: a cross-site `Origin`.",
        false,
    ),
    ("408", "BodyTimeout", "`request_timeout`: the body did not arrive within `server.body_read_timeout_secs`.", false),
    ("413", "TooLarge", "`payload_too_large`: the body is over `limits.max_body_bytes`.", false),
    (
        "429",
        "RateLimited",
        "`rate_limited`: more requests from this client than `limits.rate_limit_per_sec` allows.",
        true,
    ),
    (
        "503",
        "TooManyConnections",
        "`too_many_connections`: the port already has `server.max_connections` connections open.",
        true,
    ),
];

struct Guarded;

impl Modify for Guarded {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        for (_, name, description, retry) in REFUSALS {
            let mut r = ResponseBuilder::new().description(*description).content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
            );
            if *retry {
                let secs = HeaderBuilder::new()
                    .schema(Some(<u64 as PartialSchema>::schema()))
                    .description(Some("Seconds to wait before sending the request again."))
                    .build();
                r = r.header("Retry-After", secs);
            }
            components.responses.insert((*name).to_owned(), RefOr::T(r.build()));
        }
        for item in doc.paths.paths.values_mut() {
            for op in operations(item) {
                for (status, name, _, _) in REFUSALS {
                    // A route's own description of the status (e.g. 429 `queue_full`) stays;
                    // it names the guard's code too.
                    let ours = Ref::new(format!("#/components/responses/{name}"));
                    op.responses.responses.entry((*status).to_owned()).or_insert(RefOr::Ref(ours));
                }
            }
        }
    }
}

/// `SubmitBody` with its one rule a struct cannot say: `prompt` or `content` is required.
struct PromptRequired;

impl Modify for PromptRequired {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let schemas = &mut doc.components.get_or_insert_with(Default::default).schemas;
        let Some(body) = schemas.remove("SubmitBody") else { return };
        let required = |f: &str| ObjectBuilder::new().required(f).build();
        let either = AnyOfBuilder::new().item(required("prompt")).item(required("content"));
        let all = AllOfBuilder::new().item(body).item(either).description(Some(
            "The body of POST /task/delegate: `prompt` (or its alias `content`) and the optional fields below; \
             any other field is refused.",
        ));
        schemas.insert("SubmitBody".to_owned(), RefOr::T(Schema::AllOf(all.build())));
    }
}

/// The document.
pub fn document() -> openapi::OpenApi {
    Doc::openapi()
}

/// The document as served at `/openapi.json` and kept in `docs/openapi.json` (pretty, with a
/// final newline).
pub fn json() -> &'static str {
    static JSON: LazyLock<String> = LazyLock::new(|| {
        let mut s = document().to_pretty_json().expect("the document serializes");
        s.push('\n');
        s
    });
    &JSON
}

#[cfg(test)]
mod tests {
    use koubou_api::SUBMIT_FIELDS;

    use super::*;

    /// The properties of a derived object schema.
    fn properties<T: utoipa::PartialSchema>() -> Vec<String> {
        match T::schema() {
            utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(o)) => o.properties.keys().cloned().collect(),
            _ => panic!("not an object schema"),
        }
    }

    #[test]
    fn the_submit_schema_has_exactly_the_fields_read() {
        let schema = properties::<SubmitBody>();
        for f in SUBMIT_FIELDS {
            assert!(
                schema.contains(&f.to_string()),
                "SubmitRequest::from_json reads {f:?} but SubmitBody (its OpenAPI schema) has no such field: \
                 add `{f}` to SubmitBody with its type and a doc comment, then regenerate docs/openapi.json"
            );
        }
        for f in &schema {
            assert!(
                SUBMIT_FIELDS.contains(&f.as_str()),
                "SubmitBody (the OpenAPI schema of POST /task/delegate) has {f:?}, which \
                 SubmitRequest::from_json refuses: add it to SUBMIT_FIELDS and read it, or remove it"
            );
        }
        // Unknown fields are refused, so the schema says so.
        let utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(o)) =
            <SubmitBody as utoipa::PartialSchema>::schema()
        else {
            unreachable!()
        };
        let extra = serde_json::to_value(&o.additional_properties).unwrap();
        assert_eq!(extra, serde_json::json!(false), "SubmitBody must say additionalProperties: false");
    }
}
