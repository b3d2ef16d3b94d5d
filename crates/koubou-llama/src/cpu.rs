//! Which instruction sets this build of Koubou (and of llama.cpp inside it) uses, whether the
//! running CPU has them, and what ggml reports about itself.
//!
//! A build made for the CPU it runs on (`-C target-cpu=native`, what `scripts/quickstart.sh` and
//! `scripts/test.sh` do; their target dirs are keyed by `scripts/cpu-signature.sh`) uses AVX-512
//! where the machine has it. Copied to a CPU without those instructions it would die with SIGILL
//! at the first one; [`check`] turns that into a clear message before llama.cpp runs. A portable
//! build (`x86-64-v3`, the default of `.cargo/config.toml`) runs everywhere here and
//! [`unused`] names what it leaves on the table.
//!
//! The list is Rust's view (`cfg!(target_feature)` at compile time, `is_x86_feature_detected!`
//! at run time). llama.cpp is compiled by the C compiler for the same target (llama-cpp-sys-2
//! passes `-march` from Rust's `target-cpu`), so it uses the same extensions; [`system_info`] is
//! ggml's own account of what it was compiled with.

use std::sync::Mutex;

/// One instruction-set extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Rust's name for it (`avx512f`).
    pub name: &'static str,
    /// The build was compiled to use it.
    pub compiled: bool,
    /// The running CPU has it.
    pub present: bool,
}

macro_rules! x86_extensions {
    ($($name:tt),* $(,)?) => {
        /// The x86 extensions that matter for llama.cpp's kernels (and for a SIGILL).
        #[cfg(target_arch = "x86_64")]
        pub fn extensions() -> Vec<Extension> {
            vec![$(Extension {
                name: $name,
                compiled: cfg!(target_feature = $name),
                present: std::arch::is_x86_feature_detected!($name),
            }),*]
        }
    };
}

x86_extensions!(
    "sse4.2",
    "popcnt",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi1",
    "bmi2",
    "lzcnt",
    "movbe",
    "avxvnni",
    "avx512f",
    "avx512bw",
    "avx512cd",
    "avx512dq",
    "avx512vl",
    "avx512vnni",
    "avx512bf16",
    "avx512vbmi",
    "avx512vbmi2",
    "avx512ifma",
    "avx512bitalg",
    "avx512vpopcntdq",
    "avx512fp16",
    "gfni",
    "vaes",
    "vpclmulqdq",
);

/// Elsewhere: nothing to check (the build and the CPU are taken to agree).
#[cfg(not(target_arch = "x86_64"))]
pub fn extensions() -> Vec<Extension> {
    Vec::new()
}

/// Extensions the build uses that the CPU lacks: running llama.cpp here would crash.
pub fn missing(exts: &[Extension]) -> Vec<&'static str> {
    exts.iter().filter(|e| e.compiled && !e.present).map(|e| e.name).collect()
}

/// Extensions the CPU has that the build does not use (a portable build on an AVX-512 machine).
pub fn unused(exts: &[Extension]) -> Vec<&'static str> {
    exts.iter().filter(|e| e.present && !e.compiled).map(|e| e.name).collect()
}

/// The build needs instructions this CPU does not have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "this koubou was compiled for another CPU: it uses {}, which this CPU lacks (running it would \
     crash with SIGILL). Build it on this machine: scripts/quickstart.sh keeps one build per CPU, \
     or `cargo install --locked --path crates/koubou` without RUSTFLAGS for a portable build",
    .missing.join(", ")
)]
pub struct CpuMismatch {
    pub missing: Vec<&'static str>,
}

/// Whether this CPU can run what the build was compiled for.
pub fn check() -> Result<(), CpuMismatch> {
    check_extensions(&extensions())
}

fn check_extensions(exts: &[Extension]) -> Result<(), CpuMismatch> {
    let missing = missing(exts);
    if missing.is_empty() { Ok(()) } else { Err(CpuMismatch { missing }) }
}

/// A one-line account of the build for logs: `native build (avx512f …)` or `portable build;
/// this CPU also has avx512f … which it leaves unused`.
pub fn describe(exts: &[Extension]) -> String {
    let used: Vec<&str> = exts.iter().filter(|e| e.compiled).map(|e| e.name).collect();
    let unused = unused(exts);
    let top = used.iter().rev().find(|n| n.starts_with("avx")).copied().unwrap_or("no AVX");
    if unused.is_empty() {
        format!("compiled for this CPU's instructions (up to {top})")
    } else {
        format!(
            "compiled up to {top}; this CPU also has {}, which this build leaves unused (build with \
             RUSTFLAGS=\"-C target-cpu=native\" to use them)",
            unused.join(", ")
        )
    }
}

/// ggml's report of the CPU features it was compiled with, e.g. `CPU : SSE3 = 1 | … | AVX512 = 1
/// | … | OPENMP = 1 | REPACK = 1 |` (llama.cpp's `llama_print_system_info`).
pub fn system_info() -> String {
    // llama.cpp builds the answer in a static std::string: one caller at a time, copied out.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: returns a NUL-terminated string owned by llama.cpp, valid until the next call,
    // which the lock holds off while it is copied.
    let s = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    s.to_string_lossy().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(name: &'static str, compiled: bool, present: bool) -> Extension {
        Extension { name, compiled, present }
    }

    #[test]
    fn a_native_build_on_an_older_cpu_is_refused_by_name() {
        // Built on an AVX-512 machine, run on an AVX2-only one.
        let exts = [ext("avx2", true, true), ext("avx512f", true, false), ext("avx512vnni", true, false)];
        assert_eq!(missing(&exts), ["avx512f", "avx512vnni"]);
        let err = check_extensions(&exts).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("avx512f, avx512vnni"), "{msg}");
        assert!(msg.contains("SIGILL") && msg.contains("quickstart"), "{msg}");
        assert!(unused(&exts).is_empty());
    }

    #[test]
    fn a_portable_build_on_an_avx512_cpu_runs_and_names_what_it_leaves_unused() {
        let exts = [ext("avx2", true, true), ext("fma", true, true), ext("avx512f", false, true)];
        assert_eq!(check_extensions(&exts), Ok(()));
        assert_eq!(unused(&exts), ["avx512f"]);
        let d = describe(&exts);
        assert!(d.contains("up to avx2") && d.contains("avx512f") && d.contains("target-cpu=native"), "{d}");
        // A native build on its own CPU: nothing missing, nothing unused.
        let native = [ext("avx2", true, true), ext("avx512f", true, true), ext("gfni", false, false)];
        assert_eq!(check_extensions(&native), Ok(()));
        assert!(unused(&native).is_empty());
        assert!(describe(&native).contains("up to avx512f"), "{}", describe(&native));
    }

    #[test]
    fn this_test_binary_runs_on_its_cpu_and_ggml_agrees_about_avx512() {
        // The test is running, so its own build cannot lack anything it uses.
        check().expect("the running build fits the running CPU");
        let info = system_info();
        assert!(info.contains("CPU :"), "{info}");
        if cfg!(target_arch = "x86_64") {
            assert!(info.contains("AVX2 = 1"), "every build here compiles ggml with AVX2: {info}");
            // llama.cpp is compiled for the same target as the Rust code: AVX-512 in both or neither.
            let avx512 = extensions().iter().any(|e| e.name == "avx512f" && e.compiled);
            assert_eq!(info.contains("AVX512 = 1"), avx512, "{info}");
        }
    }
}
