//! A GGUF file's bytes: the check never panics and never reads past the slice; and reading only
//! the start of the file (as `check_file` does, growing the read when asked) reaches the same
//! verdict as reading it whole, unless it says it needs more bytes.
#![no_main]

use koubou_gguf::{ErrorKind, GgufError, parse, parse_prefix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    let cut = data.first().map_or(0, |&b| data.len() * usize::from(b) / 255);
    match parse_prefix(&data[..cut], data.len() as u64) {
        Err(GgufError { kind: ErrorKind::NeedMore { need }, .. }) => {
            assert!(need > cut as u64, "asked for {need} bytes with {cut} in hand");
        }
        early => assert_eq!(early, whole, "the first {cut} of {} bytes decided otherwise", data.len()),
    }
});
