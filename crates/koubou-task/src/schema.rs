//! JSON Schemas (for the REST API's OpenAPI document) of the vocabulary types whose JSON is not
//! what their Rust shape suggests: newtypes sent as a bare string or integer, with their rules.
//! Struct and enum types derive theirs (`utoipa::ToSchema`) beside their definition.

use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        ObjectBuilder, RefOr, Schema, SchemaFormat,
        schema::{SchemaType, Type},
    },
};

use crate::{Priority, TaskId, TaskKind, WorkerId};

fn string(description: &str) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)).description(Some(description))
}

impl PartialSchema for TaskId {
    fn schema() -> RefOr<Schema> {
        string("A task's id: a UUIDv7, so ids sort by creation time.")
            .format(Some(SchemaFormat::Custom("uuid".into())))
            .examples(["0193a4b2-7c1e-7d3f-9a40-1b2c3d4e5f60"])
            .into()
    }
}
impl ToSchema for TaskId {}

impl PartialSchema for WorkerId {
    fn schema() -> RefOr<Schema> {
        string("A worker's id: `<node>/<n>`, e.g. `serve-4f2a/3`.").into()
    }
}
impl ToSchema for WorkerId {}

/// [`TaskKind::parse`]'s rule as a JSON Schema pattern.
pub const TASK_KIND_PATTERN: &str = "^[a-z0-9_-]{1,64}$";

impl PartialSchema for TaskKind {
    fn schema() -> RefOr<Schema> {
        string("A task's type: `general`, `code`, or a custom type declared in the server's config.")
            .pattern(Some(TASK_KIND_PATTERN))
            .examples(["general", "code"])
            .into()
    }
}
impl ToSchema for TaskKind {}

impl PartialSchema for Priority {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::Integer))
            .description(Some("1 (lowest) to 10 (highest); higher runs first, FIFO within one priority."))
            .minimum(Some(Priority::MIN))
            .maximum(Some(Priority::MAX))
            .into()
    }
}
impl ToSchema for Priority {}
