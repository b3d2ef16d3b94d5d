//! The REST API's OpenAPI 3.1 document, served at `GET /openapi.json` and kept in
//! `docs/openapi.json`.
//!
//! It is made from the code, so it cannot drift from it: each handler's `#[utoipa::path]` gives
//! its path, parameters and answers, and the shapes are the types the handlers send, which
//! derive their schemas (`utoipa::ToSchema`). What the code does not say itself is added here:
//! the aliases of `GET /task/{id}/status`, the refusals of the guard and the body limit that any
//! route may answer, and that a submission needs `prompt` or `content`.

use std::sync::LazyLock;

use koubou_system::api::ErrorBody;
use utoipa::{
    IntoResponses, Modify, OpenApi, PartialSchema,
    openapi::{
        self, AllOfBuilder, ContentBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Schema,
        header::HeaderBuilder,
        path::{Operation, PathItem},
        schema::AnyOfBuilder,
    },
};

use crate::rest;

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
        rest::workers, rest::health, rest::system_status, rest::metrics, rest::system_info, rest::openapi_json,
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
