//! One `koubou serve` per node and home: a second one is refused while the first lives, and a
//! killed one is replaced at once by the next start (it takes over the node's registration
//! without waiting out its TTL).

mod support;

use std::{process::Command, time::Duration};

use support::{FakeLlm, Serve, bin, home_with_fake};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_is_refused_while_the_first_lives_and_a_killed_one_is_replaced_at_once() {
    let (_fake, addr) = FakeLlm::start(Duration::from_millis(10)).await;
    let home = tempfile::tempdir().unwrap();
    home_with_fake(home.path(), addr, "");
    let first = Serve::start(home.path(), &[]);
    let h = home.path().to_owned();
    let second = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(["serve", "--port", "0", "--ws-port", "0", "--graphql-port", "0", "--home"])
            .arg(&h)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second serve started: {err}");
    assert!(err.contains("another `koubou serve` is running"), "{err}");
    // The first is unharmed.
    let health: serde_json::Value = reqwest::get(format!("{}/health", first.url)).await.unwrap().json().await.unwrap();
    assert_eq!(health["server"], "koubou");
    // Killed, it is replaced by the next start, well within the registration's 30 s TTL.
    first.kill9();
    let started = std::time::Instant::now();
    let again = Serve::start(home.path(), &[]);
    assert!(started.elapsed() < Duration::from_secs(25), "waited for the dead run's registration to expire");
    let log = std::fs::read_to_string(&again.stderr_log).unwrap();
    assert!(log.contains("took over the registration of an earlier run of this node"), "{log}");
}
