//! `koubou.toml`: any text parses to a config or a parse error, and any config validates or is
//! refused with a message; none of it panics.
#![no_main]

use koubou_system::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(cfg) = Config::parse(text, "fuzz.toml") {
        if let Err(e) = cfg.validate() {
            assert!(!e.to_string().is_empty());
        }
    }
});
