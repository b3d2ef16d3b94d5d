//! Structured output: checking that an answer is the JSON its task asked for.
//!
//! Why it exists: providers can be asked to constrain what they generate (Ollama's `format`,
//! OpenAI's `response_format`, a llama.cpp grammar), but not all can, and none guarantees a
//! valid answer (a length cut, a provider that ignores the field). So the router checks every
//! answer of a task that asked for JSON here, whichever backend served it, and an answer that
//! does not parse or does not validate fails the attempt with the reason.
//!
//! Schemas are compiled without any resolver: a `$ref` to a URL or a file is an error, never
//! a download.

use std::sync::Arc;

use serde_json::Value;

use crate::ResponseFormat;

/// The most characters of an answer quoted in an error.
const QUOTE_MAX: usize = 120;

/// A compiled [`ResponseFormat`], ready to check answers.
#[derive(Clone)]
pub struct Checker {
    format: ResponseFormat,
    validator: Option<Arc<jsonschema::Validator>>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker").field("format", &self.format).finish_non_exhaustive()
    }
}

/// Compiles a JSON Schema, saying what is wrong with it when it cannot be used.
pub fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    if !schema.is_object() {
        return Err(format!("must be a JSON Schema object, got {}", kind_of(schema)));
    }
    jsonschema::validator_for(schema).map_err(|e| format!("is not a usable JSON Schema: {e}"))
}

impl Checker {
    pub fn new(format: ResponseFormat) -> Result<Checker, String> {
        let validator = match &format {
            ResponseFormat::Json => None,
            ResponseFormat::Schema(s) => Some(Arc::new(compile(s)?)),
        };
        Ok(Checker { format, validator })
    }

    pub fn format(&self) -> &ResponseFormat {
        &self.format
    }

    /// `Ok` when `answer` (surrounding whitespace aside) is JSON, valid against the schema if
    /// there is one; else why not, in words.
    pub fn check(&self, answer: &str) -> Result<(), String> {
        let text = answer.trim();
        let value: Value = serde_json::from_str(text).map_err(|e| {
            if text.is_empty() {
                "the answer is empty, not JSON".to_owned()
            } else {
                format!("the answer is not JSON ({e}); it begins {:?}", quote(text))
            }
        })?;
        if let Some(v) = &self.validator {
            let errors: Vec<String> = v
                .iter_errors(&value)
                .take(3)
                .map(|e| {
                    let at = e.instance_path().to_string();
                    if at.is_empty() { e.to_string() } else { format!("at {at}: {e}") }
                })
                .collect();
            if !errors.is_empty() {
                return Err(format!("the answer does not match the schema: {}", errors.join("; ")));
            }
        }
        Ok(())
    }
}

/// What to add to the system prompt so the model knows to answer in JSON (OpenAI's JSON mode
/// refuses a request whose messages never say "JSON", and small models need telling).
pub fn instruction(format: &ResponseFormat) -> String {
    match format {
        ResponseFormat::Json => "Answer with JSON only: no prose, no code fences.".to_owned(),
        ResponseFormat::Schema(s) => {
            format!("Answer with JSON only (no prose, no code fences), valid against this JSON Schema: {s}")
        }
    }
}

/// The `name` OpenAI wants beside a schema (`^[a-zA-Z0-9_-]{1,64}$`): the schema's `title`,
/// cleaned up, else `answer`.
pub fn schema_name(schema: &Value) -> String {
    let title = schema.get("title").and_then(Value::as_str).unwrap_or("");
    let name: String = title
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .take(64)
        .collect();
    if name.trim_matches('_').is_empty() { "answer".to_owned() } else { name }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn quote(s: &str) -> String {
    crate::http::truncate(s, QUOTE_MAX)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_answers_must_parse() {
        let c = Checker::new(ResponseFormat::Json).unwrap();
        assert!(c.check(" {\"a\": 1}\n").is_ok());
        assert!(c.check("[1, 2]").is_ok());
        let e = c.check("Sure! Here is the JSON: {\"a\": 1}").unwrap_err();
        assert!(e.contains("not JSON") && e.contains("Sure!"), "{e}");
        assert!(c.check("").unwrap_err().contains("empty"));
        assert!(c.check("```json\n{}\n```").is_err(), "fences are not JSON");
    }

    #[test]
    fn schema_answers_must_validate() {
        let schema = json!({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}});
        let c = Checker::new(ResponseFormat::Schema(schema)).unwrap();
        assert!(c.check(r#"{"name": "koubou"}"#).is_ok());
        let e = c.check(r#"{"name": 5}"#).unwrap_err();
        assert!(e.contains("does not match the schema") && e.contains("/name"), "{e}");
        assert!(c.check(r#"{}"#).unwrap_err().contains("name"));
    }

    #[test]
    fn bad_schemas_are_refused_without_fetching_anything() {
        assert!(compile(&json!("string")).unwrap_err().contains("object"));
        assert!(compile(&json!({"type": "no-such-type"})).is_err());
        let remote = json!({"$ref": "https://example.invalid/schema.json"});
        assert!(compile(&remote).is_err(), "remote references are not resolved");
        assert!(compile(&json!({"type": "object"})).is_ok());
    }

    #[test]
    fn names_for_openai() {
        assert_eq!(schema_name(&json!({"title": "User profile"})), "User_profile");
        assert_eq!(schema_name(&json!({})), "answer");
        assert_eq!(schema_name(&json!({"title": "日本"})), "answer");
        assert_eq!(schema_name(&json!({"title": "x".repeat(80)})).len(), 64);
    }
}
