//! Shared by the real-browser tests (crates/koubou-live's and crates/koubou's): finding Debian's
//! Chromium and playwright-core, and running a script of this folder against a server.
//! Included with `#[path = "../../../tests/browser/peers.rs"] mod peers;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Chromium and the node modules holding playwright-core.
pub struct Browser {
    chromium: String,
    modules: PathBuf,
}

impl Browser {
    /// The browser the tests drive: `KOUBOU_CHROMIUM` (or /usr/bin/chromium) and
    /// `KOUBOU_NODE_MODULES` (or the cache's `node/node_modules`). None, saying so, when
    /// `KOUBOU_SKIP_REAL_PEERS=1`; a missing one fails the test naming the script that installs it.
    pub fn find() -> Option<Browser> {
        if std::env::var("KOUBOU_SKIP_REAL_PEERS").as_deref() == Ok("1") {
            eprintln!("KOUBOU_SKIP_REAL_PEERS=1: skipping the browser test");
            return None;
        }
        let chromium = std::env::var("KOUBOU_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            Path::new(&chromium).exists(),
            "no Chromium at {chromium}: run scripts/ensure-chromium.sh (or set KOUBOU_SKIP_REAL_PEERS=1)"
        );
        let modules = std::env::var("KOUBOU_NODE_MODULES").map(PathBuf::from).unwrap_or_else(|_| {
            let cache = std::env::var("KOUBOU_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/koubou"));
            cache.join("node/node_modules")
        });
        assert!(
            modules.join("playwright-core").is_dir(),
            "no playwright-core in {}: run scripts/ensure-node-tools.sh (or set KOUBOU_SKIP_REAL_PEERS=1)",
            modules.display()
        );
        Some(Browser { chromium, modules })
    }

    /// Runs `tests/browser/<script>` against the server at `url` (`http://127.0.0.1:PORT`),
    /// with `env` besides; screenshots go to `KOUBOU_ARTIFACTS` (or `artifacts/`). Fails the test
    /// when the script fails; else its standard output.
    pub async fn run(&self, script: &str, url: &str, env: &[(&str, &str)]) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let artifacts =
            std::env::var_os("KOUBOU_ARTIFACTS").map(PathBuf::from).unwrap_or_else(|| root.join("artifacts"));
        let out = tokio::process::Command::new("node")
            .arg(root.join("tests/browser").join(script))
            .env("KOUBOU_URL", url)
            .env("KOUBOU_NODE_MODULES", &self.modules)
            .env("KOUBOU_CHROMIUM", &self.chromium)
            .env("KOUBOU_ARTIFACTS", artifacts)
            .envs(env.iter().copied())
            .output()
            .await
            .expect("cannot run node (apt-get install -y nodejs npm)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stdout}\n{stderr}");
        assert!(out.status.success(), "browser test failed:\n{stdout}\n{stderr}");
        stdout.into_owned()
    }
}
