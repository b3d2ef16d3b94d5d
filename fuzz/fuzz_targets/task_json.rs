//! A `POST /task/delegate` body (also MCP's and WebSocket's `payload`), as bytes off the wire:
//! reading it never panics, every refusal names a field, and whatever is accepted passes or
//! fails the server's limits with a named field too.
#![no_main]

use koubou_api::SubmitRequest;
use koubou_task::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    match SubmitRequest::from_json(&value) {
        Ok(req) => {
            if let Err(e) = Limits::default().check(&req.task) {
                assert!(!e.field.is_empty(), "a limit refused {value} without naming the field");
            }
        }
        Err(e) => assert!(!e.field.is_empty(), "{value} was refused without naming the field: {e}"),
    }
});
