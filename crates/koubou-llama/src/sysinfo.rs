//! What the linked ggml was built to use, asked of ggml itself at run time
//! (`llama_print_system_info`): build flags change, and only the library knows what is in it.

use std::ffi::CStr;

/// One ggml backend and the features it reports, e.g. `CPU` with `SSE3`, `AVX2`, `OPENMP`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendFeatures {
    pub backend: String,
    /// Features that are on (`NAME = 1`); others as `NAME=value`.
    pub features: Vec<String>,
}

/// ggml's own report of every backend compiled in and its features.
pub fn ggml_features() -> Vec<BackendFeatures> {
    // SAFETY: llama_print_system_info takes no arguments and returns a NUL-terminated string
    // owned by llama.cpp (a static buffer), valid until the next call; it is copied at once.
    let raw = unsafe { CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    parse(&raw.to_string_lossy())
}

/// `"CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 | Metal : … | "` → one entry per backend.
fn parse(report: &str) -> Vec<BackendFeatures> {
    let mut out: Vec<BackendFeatures> = Vec::new();
    for item in report.split('|').map(str::trim).filter(|s| !s.is_empty()) {
        let feature = match item.split_once(" : ") {
            Some((backend, first)) => {
                out.push(BackendFeatures { backend: backend.trim().to_owned(), features: Vec::new() });
                first.trim()
            }
            None => item,
        };
        let Some(current) = out.last_mut() else { continue };
        match feature.split_once('=').map(|(n, v)| (n.trim(), v.trim())) {
            Some((name, "1")) => current.features.push(name.to_owned()),
            Some((_, "0")) => {}
            Some((name, value)) => current.features.push(format!("{name}={value}")),
            None if !feature.is_empty() => current.features.push(feature.to_owned()),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_report() {
        let r = parse("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | OPENMP = 1 | Metal : EMBED_LIBRARY = 1 | ARCH = 7 | ");
        assert_eq!(
            r,
            vec![
                BackendFeatures {
                    backend: "CPU".into(),
                    features: vec!["SSE3".into(), "AVX2".into(), "OPENMP".into()]
                },
                BackendFeatures { backend: "Metal".into(), features: vec!["EMBED_LIBRARY".into(), "ARCH=7".into()] },
            ]
        );
        assert!(parse("").is_empty());
    }

    #[test]
    fn the_linked_ggml_reports_its_cpu_backend() {
        let r = ggml_features();
        let cpu = r.iter().find(|b| b.backend == "CPU").unwrap_or_else(|| panic!("no CPU backend in {r:?}"));
        // This build links llama.cpp with OpenMP (the `openmp` feature of llama-cpp-sys-2).
        assert!(cpu.features.iter().any(|f| f == "OPENMP"), "{cpu:?}");
    }
}
