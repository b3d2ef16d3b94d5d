//! `koubou --version`: the version, the features compiled in and, with the embedded engine, the
//! CPU instructions its ggml was built to use — asked of ggml at run time, since build flags
//! change — beside what this CPU has.

/// The text after `koubou ` for `--version` (`-V` prints the version alone).
pub fn long() -> String {
    let mut out = env!("CARGO_PKG_VERSION").to_owned();
    if cfg!(feature = "embedded") {
        out += "\nfeatures: embedded (GGUF models run in-process by llama.cpp)";
    } else {
        out += "\nfeatures: none (built without the embedded engine: --no-default-features)";
    }
    for line in engine() {
        out += "\n";
        out += &line;
    }
    out
}

#[cfg(feature = "embedded")]
fn engine() -> Vec<String> {
    let mut lines = Vec::new();
    for b in koubou_llama::sysinfo::ggml_features() {
        lines.push(format!("embedded engine, ggml {} backend built with: {}", b.backend, b.features.join(" ")));
        if b.backend != "CPU" {
            continue;
        }
        let (missing, unused) = compare_cpu(&b.features);
        lines.push(match (missing.is_empty(), cpu_instructions().is_empty()) {
            (_, true) => "this CPU: not inspected on this architecture".to_owned(),
            (true, false) => "this CPU: has every instruction set above".to_owned(),
            (false, false) => format!("this CPU: LACKS {} (this build will not run here)", missing.join(" ")),
        });
        if !unused.is_empty() {
            lines.push(format!("this CPU also has, unused by this build: {}", unused.join(" ")));
        }
    }
    lines
}

#[cfg(not(feature = "embedded"))]
fn engine() -> Vec<String> {
    Vec::new()
}

/// Of ggml's CPU features, those this CPU lacks; of this CPU's, those ggml was not built with.
#[cfg_attr(not(feature = "embedded"), allow(dead_code))]
fn compare_cpu(built: &[String]) -> (Vec<&'static str>, Vec<&'static str>) {
    let cpu = cpu_instructions();
    let missing = cpu.iter().filter(|(name, has)| !has && built.iter().any(|b| b == name)).map(|(n, _)| *n).collect();
    let unused = cpu.iter().filter(|(name, has)| *has && !built.iter().any(|b| b == name)).map(|(n, _)| *n).collect();
    (missing, unused)
}

/// The instruction sets ggml reports, by ggml's names, and whether this CPU has each (detected
/// at run time by the standard library).
#[cfg(target_arch = "x86_64")]
fn cpu_instructions() -> Vec<(&'static str, bool)> {
    use std::arch::is_x86_feature_detected as has;
    vec![
        ("SSE3", has!("sse3")),
        ("SSSE3", has!("ssse3")),
        ("AVX", has!("avx")),
        ("AVX2", has!("avx2")),
        ("F16C", has!("f16c")),
        ("FMA", has!("fma")),
        ("BMI2", has!("bmi2")),
        ("AVX_VNNI", has!("avxvnni")),
        ("AVX512", has!("avx512f")),
        ("AVX512_VBMI", has!("avx512vbmi")),
        ("AVX512_VNNI", has!("avx512vnni")),
        ("AVX512_BF16", has!("avx512bf16")),
    ]
}

#[cfg(target_arch = "aarch64")]
fn cpu_instructions() -> Vec<(&'static str, bool)> {
    use std::arch::is_aarch64_feature_detected as has;
    vec![
        ("NEON", has!("neon")),
        ("DOTPROD", has!("dotprod")),
        ("MATMUL_INT8", has!("i8mm")),
        ("FP16_VA", has!("fp16")),
        ("SVE", has!("sve")),
    ]
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_instructions() -> Vec<(&'static str, bool)> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_version_and_features() {
        let v = long();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
        assert!(v.contains("\nfeatures: "), "{v}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn compares_what_ggml_was_built_with_against_this_cpu() {
        let cpu = cpu_instructions();
        let has = |n: &str| cpu.iter().any(|(name, h)| *name == n && *h);
        // x86-64 always has SSE2 but not necessarily SSE3; take one the CPU has and one it lacks
        // if any, and check each lands on the right side.
        let built: Vec<String> = cpu.iter().map(|(n, _)| n.to_string()).collect();
        let (missing, unused) = compare_cpu(&built);
        assert!(unused.is_empty(), "{unused:?}");
        assert!(missing.iter().all(|n| !has(n)), "{missing:?}");
        let (missing, unused) = compare_cpu(&[]);
        assert!(missing.is_empty());
        assert!(unused.iter().all(|n| has(n)) && unused.len() == cpu.iter().filter(|(_, h)| *h).count());
    }
}
