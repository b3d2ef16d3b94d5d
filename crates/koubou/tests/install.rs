//! What an installed `koubou` tells about itself: `--version` (features, and the CPU
//! instructions the embedded engine's ggml was built with, asked of ggml) and shell completions.

mod support;

use std::process::Command;

fn koubou(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(support::bin()).args(args).output().expect("run koubou");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn version_names_the_features_and_what_the_engine_was_built_with() {
    let (code, short, _) = koubou(&["-V"]);
    assert_eq!(code, 0);
    assert_eq!(short.trim(), format!("koubou {}", env!("CARGO_PKG_VERSION")));
    let (code, long, err) = koubou(&["--version"]);
    assert_eq!(code, 0, "{err}");
    assert!(long.starts_with(&format!("koubou {}\n", env!("CARGO_PKG_VERSION"))), "{long}");
    if cfg!(feature = "embedded") {
        assert!(long.contains("features: embedded"), "{long}");
        // The CPU backend's line comes from ggml at run time; this build links OpenMP.
        let ggml =
            long.lines().find(|l| l.contains("ggml CPU backend built with:")).unwrap_or_else(|| panic!("{long}"));
        assert!(ggml.contains("OPENMP"), "{ggml}");
        assert!(long.lines().any(|l| l.starts_with("this CPU: ")), "{long}");
        if cfg!(target_arch = "x86_64") {
            // .cargo/config.toml builds for x86-64-v3, so ggml was compiled with AVX2.
            assert!(ggml.contains("AVX2"), "{ggml}");
        }
    } else {
        assert!(long.contains("features: none"), "{long}");
        assert!(!long.contains("ggml"), "{long}");
    }
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, script, err) = koubou(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        // fish spells long options `-l max-workers`, the others `--max-workers`.
        for word in ["koubou", "serve", "submit", "completions", "max-workers"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let (code, _, err) = koubou(&["completions", "tcsh"]);
    assert_eq!(code, 2, "an unknown shell is a usage error: {err}");
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
}
