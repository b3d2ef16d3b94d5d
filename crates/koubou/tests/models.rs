//! Model files through the real binary: malformed GGUFs refused by `models pull`, a file that
//! makes llama.cpp abort killing only the trial-load child, `serve` staying up with such a model,
//! and pulls over real HTTPS (a throwaway CA, the real SmolLM2 file) cut, resumed, and refused.
#![cfg(feature = "embedded")]

mod support;

use std::{
    collections::HashMap,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use koubou_llama::gguf::{self, Writer};
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{Serve, bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

fn test_model() -> PathBuf {
    PathBuf::from(std::env::var_os("KOUBOU_TEST_MODEL").expect("KOUBOU_TEST_MODEL (source /work/env.sh)"))
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `koubou <args>` with the store in `models` and extra environment.
fn koubou(models: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .env("KOUBOU_MODELS_DIR", models)
        .env_remove("HF_ENDPOINT")
        .env_remove("SSL_CERT_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run koubou")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn listed(models: &Path) -> Vec<String> {
    let o = koubou(models, &["--json", "models", "list"], &[("OLLAMA_HOST", "127.0.0.1:9")]);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
}

/// Files in `dir` (names), for "nothing left behind" checks.
fn dir_listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A valid small GGUF (three tensors) to corrupt.
fn small_valid() -> Vec<u8> {
    Writer::new()
        .string("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .strings("tokenizer.ggml.tokens", &["a", "b"])
        .tensor("token_embd.weight", &[64, 2], 8)
        .tensor("output_norm.weight", &[64], 0)
        .build()
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The table of malformed files: (name, bytes, words the refusal must contain).
fn malformed() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good = small_valid();
    let table = good.windows(17).position(|w| w == b"token_embd.weight").unwrap() - 8;
    let offset_at = table + 8 + 17 + 4 + 16 + 4;
    vec![
        ("truncated-header", good[..13].to_vec(), "truncated"),
        ("bad-magic", [b"GGML".as_slice(), &good[4..]].concat(), "not a GGUF file"),
        ("wrong-version", Writer::new().version(7).string("general.architecture", "llama").build(), "version 7"),
        (
            "absurd-tensor-count",
            {
                let mut b = good.clone();
                put_u64(&mut b, 8, 1 << 62);
                b
            },
            "claims 4611686018427387904 tensors",
        ),
        (
            "absurd-kv-count",
            {
                let mut b = good.clone();
                put_u64(&mut b, 16, u64::MAX);
                b
            },
            "metadata entries",
        ),
        (
            "string-past-end",
            {
                let mut b = good.clone();
                put_u64(&mut b, 24, 1 << 30);
                b
            },
            "truncated",
        ),
        (
            "offset-past-end",
            {
                let mut b = good.clone();
                put_u64(&mut b, offset_at, 1 << 40);
                b
            },
            "starts at data offset 1099511627776",
        ),
        (
            "misaligned-data",
            {
                let mut b = good.clone();
                put_u64(&mut b, offset_at, 7);
                b
            },
            "not a multiple of the alignment",
        ),
        ("data-cut-off", good[..good.len() - 64].to_vec(), "past the end of the file"),
        ("aborts-llama-cpp", gguf::aborting_model(), "SIGABRT"),
    ]
}

#[test]
fn models_pull_refuses_each_malformed_gguf_with_the_reason() {
    let t = tempfile::tempdir().unwrap();
    let models = t.path().join("models");
    for (name, bytes, why) in malformed() {
        let p = t.path().join(format!("{name}.gguf"));
        std::fs::write(&p, &bytes).unwrap();
        let o = koubou(&models, &["models", "pull", p.to_str().unwrap()], &[]);
        assert!(!o.status.success(), "{name} was accepted: {}", text(&o));
        assert_eq!(o.status.code(), Some(10), "{name}: an error exit, not a crash: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("is not a usable GGUF model") && err.contains(why), "{name}: {err}");
    }
    assert!(listed(&models).is_empty(), "nothing was registered");
}

#[test]
fn the_aborting_file_kills_the_trial_child_not_the_parent() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("aborts.gguf");
    let bytes = gguf::aborting_model();
    assert_eq!(bytes.len(), 320);
    std::fs::write(&p, &bytes).unwrap();
    // The structural check passes: only llama.cpp itself finds the problem, by aborting.
    assert!(gguf::parse(&bytes).is_ok());
    // Loaded directly, llama.cpp aborts the process.
    let o = Command::new(bin()).args(["models", "check-load"]).arg(&p).env("GGML_NO_BACKTRACE", "1").output().unwrap();
    assert_eq!(o.status.signal(), Some(SIGABRT), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("GGML_ASSERT"), "{}", text(&o));
    // Through a trial loader, this (parent) process learns why and carries on.
    let loader = koubou_llama::TrialLoader::new(bin(), ["models", "check-load"]);
    let err = loader.run(&p).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("SIGABRT") && msg.contains("n_layer_all"), "{msg}");
    // And the real model passes the same trial.
    let report = loader.run(&test_model()).unwrap();
    assert_eq!(report.architecture, "llama");
    assert!(report.n_params > 100_000_000 && report.decoded > 0, "{report:?}");
}

const SIGABRT: i32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_bad_model_stays_up_and_says_why() {
    let home = tempfile::tempdir().unwrap();
    let bad = home.path().join("aborts.gguf");
    std::fs::write(&bad, gguf::aborting_model()).unwrap();
    let cfg = format!(
        r#"
[pool]
min_workers = 1
max_workers = 2
[backends.embedded]
kind = "embedded"
model = "{}"
[backends.echo]
kind = "echo"
[types.general]
backend = "embedded"
fallback = "echo"
[types.code]
backend = "echo"
"#,
        bad.display()
    );
    std::fs::write(home.path().join("koubou.toml"), cfg).unwrap();
    let models = home.path().join("models");
    let s = Serve::start_with_env(home.path(), &[], &[("KOUBOU_MODELS_DIR", models.to_str().unwrap())]);
    let http = reqwest::Client::new();
    // /health: up (degraded), the embedded backend down with the reason, echo up.
    let mut embedded = Value::Null;
    for _ in 0..120 {
        let h: Value = http.get(format!("{}/health", s.url)).send().await.unwrap().json().await.unwrap();
        embedded = h["backends"].as_array().unwrap().iter().find(|b| b["name"] == "embedded").unwrap().clone();
        if !embedded["detail"].as_str().unwrap().contains("still checking") {
            assert_eq!(h["status"], "degraded", "{h}");
            let echo = h["backends"].as_array().unwrap().iter().find(|b| b["name"] == "echo").unwrap();
            assert_eq!(echo["up"], true, "{h}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(embedded["up"], false, "{embedded}");
    let detail = embedded["detail"].as_str().unwrap();
    assert!(detail.contains("SIGABRT") && detail.contains("GGML_ASSERT"), "{detail}");
    // Tasks still run: `code` on echo, `general` falls back from the broken embedded to echo.
    for kind in ["code", "general"] {
        let v: Value = http
            .post(format!("{}/task/delegate", s.url))
            .json(&serde_json::json!({"type": kind, "prompt": "still here", "sync": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "completed", "{kind}: {v}");
        assert_eq!(v["task"]["backend"], "echo", "{kind}: {v}");
    }
    // `koubou health` prints the reason in full.
    let (code, out, err) = support::cli(home.path(), &s.url, &["health"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("embedded is down:") && out.contains("SIGABRT"), "{out}");
    // The server process is alive after all of this.
    let h = http.get(format!("{}/health", s.url)).send().await.unwrap();
    assert_eq!(h.status().as_u16(), 200);
}

// ---- HTTPS file server -------------------------------------------------------------------

/// One request the server saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    range: Option<String>,
    if_range: Option<String>,
    status: u16,
}

#[derive(Default)]
struct FilesState {
    files: HashMap<String, (Arc<Vec<u8>>, String)>,
    seen: Vec<Seen>,
    /// Cut the next response after this many body bytes.
    cut_next: Option<usize>,
}

/// A small HTTP/1.1 file server over TLS (a certificate for 127.0.0.1 from a throwaway CA) that
/// honours `Range` + `If-Range` and can cut a response mid-body.
#[derive(Clone)]
struct Files {
    state: Arc<Mutex<FilesState>>,
    url: String,
    ca_pem: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl Files {
    async fn start() -> Files {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "koubou test CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let state = Arc::new(Mutex::new(FilesState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve_one(tls, st).await;
                    }
                });
            }
        });
        Files { state, url, ca_pem, _dir: Arc::new(dir) }
    }

    fn put(&self, path: &str, body: Vec<u8>, etag: &str) {
        self.state.lock().unwrap().files.insert(path.into(), (Arc::new(body), etag.into()));
    }

    fn cut_next(&self, at: usize) {
        self.state.lock().unwrap().cut_next = Some(at);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

async fn serve_one(
    mut s: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    st: Arc<Mutex<FilesState>>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 || head.len() > 16 << 10 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next().unwrap_or("").split(' ').nth(1).unwrap_or("").to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let range = headers.get("range").cloned();
    let if_range = headers.get("if-range").cloned();
    let (file, cut) = {
        let mut g = st.lock().unwrap();
        let f = g.files.get(&path).cloned();
        (f, g.cut_next.take())
    };
    let Some((body, etag)) = file else {
        st.lock().unwrap().seen.push(Seen { path, range, if_range, status: 404 });
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
        return s.shutdown().await;
    };
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|_| if_range.as_deref().is_none_or(|v| v == etag));
    let (status, from, extra) = match start {
        Some(n) if n < body.len() => {
            (206, n, format!("Content-Range: bytes {n}-{}/{}\r\n", body.len() - 1, body.len()))
        }
        _ => (200, 0, String::new()),
    };
    st.lock().unwrap().seen.push(Seen { path, range, if_range, status });
    let reason = if status == 206 { "Partial Content" } else { "OK" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\n{extra}Connection: close\r\n\r\n",
        body.len() - from
    );
    s.write_all(head.as_bytes()).await?;
    let end = cut.map_or(body.len(), |c| (from + c).min(body.len()));
    for chunk in body[from..end].chunks(256 << 10) {
        s.write_all(chunk).await?;
    }
    s.flush().await?;
    if cut.is_some() {
        // Drop the connection without a TLS close: the client sees the body end early.
        return Ok(());
    }
    s.shutdown().await
}

async fn pull(models: &Path, args: Vec<String>, env: Vec<(String, String)>) -> Output {
    let models = models.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        koubou(&models, &args, &env)
    })
    .await
    .unwrap()
}

fn s(v: &str) -> String {
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hf_pull_cut_midway_resumes_with_range_and_is_byte_identical() {
    let real = std::fs::read(test_model()).unwrap();
    let files = Files::start().await;
    files.put("/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/resolve/main/smollm2-135m.gguf", real.clone(), "\"v1\"");
    let t = tempfile::tempdir().unwrap();
    let models = t.path().join("models");
    let env = vec![(s("HF_ENDPOINT"), files.url.clone()), (s("SSL_CERT_FILE"), files.ca_pem.display().to_string())];
    let args = vec![
        s("models"),
        s("pull"),
        s("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m.gguf"),
        s("--name"),
        s("smol"),
    ];

    let cut = real.len() / 3;
    files.cut_next(cut);
    let first = pull(&models, args.clone(), env.clone()).await;
    assert!(!first.status.success(), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("run the same command again to resume"),
        "{}",
        text(&first)
    );
    assert!(!listed(&models).contains(&s("smol")));
    let part_len = std::fs::metadata(models.join("smollm2-135m.gguf.part")).unwrap().len() as usize;
    assert!(part_len > 0 && part_len <= cut, "{part_len} of {cut}");

    let second = pull(&models, args, env).await;
    assert!(second.status.success(), "{}", text(&second));
    let seen = files.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    // hf: mapped onto $HF_ENDPOINT/<owner>/<repo>/resolve/main/<file>.
    assert_eq!(seen[0].path, "/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/resolve/main/smollm2-135m.gguf");
    assert_eq!(seen[0].range, None);
    assert_eq!(seen[1].range.as_deref(), Some(format!("bytes={part_len}-").as_str()), "{seen:?}");
    assert_eq!(seen[1].if_range.as_deref(), Some("\"v1\""));
    assert_eq!(seen[1].status, 206);
    let got = std::fs::read(models.join("smollm2-135m.gguf")).unwrap();
    assert!(got == real, "the resumed file differs from the original");
    assert!(listed(&models).contains(&s("smol")));
    assert_eq!(dir_listing(&models), vec![s("index.json"), s("smollm2-135m.gguf")], "no part files left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_on_the_server_is_fetched_whole_not_spliced() {
    let real = std::fs::read(test_model()).unwrap();
    // The same model with one letter of its `general.name` changed: still valid, other bytes.
    let mut changed = real.clone();
    let key = changed.windows(12).position(|w| w == b"general.name").expect("the model has a name");
    let at = key + 12 + 4 + 8;
    changed[at] = if changed[at] == b'x' { b'y' } else { b'x' };
    assert!(gguf::parse(&changed).is_ok());
    let files = Files::start().await;
    files.put("/m.gguf", real.clone(), "\"a\"");
    let t = tempfile::tempdir().unwrap();
    let models = t.path().join("models");
    let url = format!("{}/m.gguf", files.url);
    let env = vec![(s("SSL_CERT_FILE"), files.ca_pem.display().to_string())];
    files.cut_next(real.len() / 2);
    let first = pull(&models, vec![s("models"), s("pull"), url.clone()], env.clone()).await;
    assert!(!first.status.success(), "{}", text(&first));
    files.put("/m.gguf", changed.clone(), "\"b\"");
    let second = pull(&models, vec![s("models"), s("pull"), url], env).await;
    assert!(second.status.success(), "{}", text(&second));
    let seen = files.seen();
    assert_eq!(seen[1].if_range.as_deref(), Some("\"a\""), "{seen:?}");
    assert_eq!(seen[1].status, 200, "the validator no longer matches: the whole file is sent");
    let got = std::fs::read(models.join("m.gguf")).unwrap();
    assert_eq!(sha_hex(&got), sha_hex(&changed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sha256_or_a_non_gguf_is_refused_and_leaves_nothing() {
    let real = std::fs::read(test_model()).unwrap();
    let files = Files::start().await;
    files.put("/smol.gguf", real.clone(), "\"s\"");
    files.put("/junk.gguf", b"<html>not a model</html>".repeat(4000), "\"j\"");
    let t = tempfile::tempdir().unwrap();
    let models = t.path().join("models");
    // The CA through --ca-file this time.
    let ca = files.ca_pem.display().to_string();

    let wrong = "0".repeat(64);
    let o = pull(
        &models,
        vec![
            s("models"),
            s("pull"),
            format!("{}/smol.gguf", files.url),
            s("--sha256"),
            wrong.clone(),
            s("--ca-file"),
            ca.clone(),
        ],
        vec![],
    )
    .await;
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("checksum mismatch") && err.contains(&wrong) && err.contains(&sha_hex(&real)), "{err}");
    assert!(listed(&models).is_empty());
    assert_eq!(dir_listing(&models), Vec::<String>::new(), "no partial left behind");

    let o = pull(
        &models,
        vec![s("models"), s("pull"), format!("{}/junk.gguf", files.url), s("--ca-file"), ca.clone()],
        vec![],
    )
    .await;
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not a usable GGUF model") && err.contains("not a GGUF file"), "{err}");
    assert!(listed(&models).is_empty());
    assert_eq!(dir_listing(&models), Vec::<String>::new());

    // Without the CA the server is not trusted.
    let o = pull(&models, vec![s("models"), s("pull"), format!("{}/smol.gguf", files.url)], vec![]).await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).to_lowercase().contains("certificate"), "{}", text(&o));

    // A missing file is an HTTP error, named.
    let o = pull(&models, vec![s("models"), s("pull"), format!("{}/none.gguf", files.url), s("--ca-file"), ca], vec![])
        .await;
    assert!(String::from_utf8_lossy(&o.stderr).contains("HTTP 404"), "{}", text(&o));
    assert_eq!(dir_listing(&models), Vec::<String>::new());
}
