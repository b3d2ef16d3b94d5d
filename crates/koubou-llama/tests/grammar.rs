//! Structured output from the real SmolLM2: a JSON Schema (or plain JSON mode) becomes a
//! llama.cpp grammar, and what the model writes parses and fits the schema.

mod common;

use std::sync::OnceLock;

use common::{backend, greedy, request};
use koubou_backend::{Backend, BackendError, CancellationToken, Discard, GenOptions, ResponseFormat};
use koubou_llama::EmbeddedBackend;
use serde_json::{Value, json};

fn shared() -> &'static EmbeddedBackend {
    static B: OnceLock<EmbeddedBackend> = OnceLock::new();
    B.get_or_init(|| backend(2))
}

async fn generate(prompt: &str, options: GenOptions, format: Option<ResponseFormat>) -> Result<String, BackendError> {
    let mut req = request(prompt, options);
    req.response_format = format;
    shared().generate(req, &Discard, CancellationToken::new()).await.map(|g| g.text)
}

/// A check of the schema subset used here: types, required properties, enums, integer bounds,
/// string and array lengths. (The schema bounds every string and array: a 135M model left free
/// repeats an array item until `max_tokens` cuts the JSON short.)
fn fits(v: &Value, schema: &Value) -> Result<(), String> {
    let ty = schema["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        return Err(format!("{v} is not of type {ty}"));
    }
    if let Some(e) = schema["enum"].as_array()
        && !e.contains(v)
    {
        return Err(format!("{v} is not one of {e:?}"));
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_i64(), v.as_i64())
        && n < min
    {
        return Err(format!("{n} < {min}"));
    }
    if let (Some(max), Some(n)) = (schema["maximum"].as_i64(), v.as_i64())
        && n > max
    {
        return Err(format!("{n} > {max}"));
    }
    if let Some(req) = schema["required"].as_array() {
        for k in req {
            let k = k.as_str().unwrap();
            if v.get(k).is_none() {
                return Err(format!("missing required {k:?} in {v}"));
            }
        }
    }
    if let Some(props) = schema["properties"].as_object() {
        for (k, s) in props {
            if let Some(x) = v.get(k) {
                fits(x, s)?;
            }
        }
        if schema["additionalProperties"] == json!(false) {
            for k in v.as_object().unwrap().keys() {
                if !props.contains_key(k) {
                    return Err(format!("unexpected property {k:?}"));
                }
            }
        }
    }
    if let (Some(max), Some(t)) = (schema["maxLength"].as_u64(), v.as_str())
        && t.chars().count() as u64 > max
    {
        return Err(format!("{t:?} is longer than {max}"));
    }
    if let (Some(max), Some(a)) = (schema["maxItems"].as_u64(), v.as_array())
        && a.len() as u64 > max
    {
        return Err(format!("{} items, more than {max}", a.len()));
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for x in arr {
            fits(x, items)?;
        }
    }
    Ok(())
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["engineer", "artist", "teacher"]},
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "age", "role", "skills"],
        "additionalProperties": false
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_constrained_answer_parses_and_fits_the_schema() {
    let schema = person_schema();
    let prompt = "Describe a fictional person as JSON with their name, age, role and skills.";
    // Greedy, and sampled with a few seeds: every answer is valid.
    let mut runs = vec![greedy(200)];
    for seed in [1, 2, 3] {
        runs.push(GenOptions {
            max_tokens: Some(200),
            temperature: Some(0.9),
            seed: Some(seed),
            ..GenOptions::default()
        });
    }
    for o in runs {
        let text = generate(prompt, o.clone(), Some(ResponseFormat::Schema(schema.clone()))).await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{o:?}: not JSON ({e}): {text:?}"));
        fits(&v, &schema).unwrap_or_else(|e| panic!("{o:?}: {e}: {text}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_gives_an_object_and_unconstrained_text_is_unchanged() {
    let prompt = "List three colours.";
    let free = generate(prompt, greedy(48), None).await.unwrap();
    let json_prompt = "Reply with a JSON object whose only key is \"colour\" and whose value is a colour.";
    let mut req = request(json_prompt, greedy(200));
    req.response_format = Some(ResponseFormat::Json);
    let (constrained, free_again) = tokio::join!(
        shared().generate(req, &Discard, CancellationToken::new()),
        // Batched next to a constrained sequence, a free one is the same as alone.
        generate(prompt, greedy(48), None),
    );
    let g = constrained.unwrap();
    assert!(g.text.starts_with('{'), "{:?}", g.text);
    // Plain JSON mode bounds nothing, so a small model may write until max_tokens: the text is
    // then a JSON object cut short, never anything else.
    match serde_json::from_str::<Value>(&g.text) {
        Ok(v) => assert!(v.is_object() && g.finish_reason == "stop", "{v}"),
        Err(e) => assert!(e.is_eof() && g.finish_reason == "length", "{e}: {:?}", g.text),
    }
    assert_eq!(free_again.unwrap(), free);
    assert!(serde_json::from_str::<Value>(&free).is_err(), "the free answer is prose: {free:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_that_cannot_be_enforced_is_rejected() {
    for bad in [json!("not a schema"), json!({"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})] {
        let err = generate("hi", greedy(8), Some(ResponseFormat::Schema(bad.clone()))).await.unwrap_err();
        assert!(matches!(err, BackendError::Rejected { status: 400, .. }), "{bad}: {err}");
        assert!(err.to_string().contains("schema"), "{err}");
    }
}
