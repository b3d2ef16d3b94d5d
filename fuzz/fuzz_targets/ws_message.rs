//! A WebSocket text frame: parsing never panics and every refusal names a field (the connection
//! answers an `error` and stays open).
#![no_main]

use koubou_api::ApiError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(e) = koubou_live::protocol::parse(text).request {
        match e {
            ApiError::Invalid(f) => assert!(!f.field.is_empty(), "{text:?}: refused without a field"),
            other => panic!("{text:?}: a malformed message must be `invalid`, got {other:?}"),
        }
    }
});
