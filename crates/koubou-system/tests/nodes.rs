//! Nodes over one queue: a node that stops renewing its registration is found dead once its TTL
//! has passed, by another node, which requeues its running tasks (and its own workers run them),
//! long before the tasks' leases would have run out.

use std::time::Duration;

use koubou_api::Api;
use koubou_queue::{Capabilities, Dispatch, Node, Nodes, SqliteQueue, TaskStore};
use koubou_system::{Config, Home, Koubou, StartOptions};
use koubou_task::{EventBus, NewTask, TaskKind, TaskStatus, WorkerId};

/// A node that stops renewing is found once its registration runs out and removed; its running
/// task goes back to the queue when its lease runs out (not before: a silent node may still be
/// running it, cut off) and a live node's worker runs it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_found_after_its_ttl_and_its_task_recovered_when_its_lease_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home { dir: dir.path().to_owned() };
    // The dead node: registered for a second, holding a task under a 3 s lease, then gone (its
    // queue dropped: no more renewals, no heartbeats).
    let id = {
        let q =
            SqliteQueue::open(home.db_file(), Default::default(), std::sync::Arc::new(EventBus::default())).unwrap();
        let ghost = Node::this_process("ghost", "0.0.0", Capabilities::any());
        q.register(&ghost, Duration::from_secs(1), None).await.unwrap();
        let t = q.submit(NewTask::new(TaskKind::general(), "left behind")).await.unwrap().task;
        let c = q.claim(&WorkerId::new("ghost", 1), &Capabilities::any(), Duration::from_secs(3)).await.unwrap();
        assert_eq!(c.unwrap().task.id, t.id);
        t.id
    };
    let cfg = Config::parse(
        "[backends.instant]\nkind = \"echo\"\n[types.general]\nbackend = \"instant\"\n[pool]\nnode_ttl_secs = 1\n",
        "test",
    )
    .unwrap();
    let k = Koubou::start(cfg, &home, StartOptions { node: "alive".into(), workers: true, ..StartOptions::default() })
        .await
        .unwrap();
    let v = k.wait(id, Duration::from_secs(120), &|_| {}).await.unwrap();
    assert_eq!(v.status, TaskStatus::Completed, "{v:?}");
    assert_eq!(v.worker_id.as_deref(), Some("alive/1"), "run again by the live node's worker");
    assert_eq!(v.attempts, 2, "the dead node's attempt counts");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while k.nodes().await.unwrap().nodes.iter().any(|n| n.id == "ghost") {
        assert!(std::time::Instant::now() < deadline, "the dead node was never removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    k.shutdown(Some(Duration::from_secs(1))).await;
}

/// A node registered from this host under the same name is an earlier run of this one (the
/// caller holds the node's lock): it is taken over; a clean stop leaves no registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_over_its_earlier_run_and_leaves_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home { dir: dir.path().to_owned() };
    let q = SqliteQueue::open(home.db_file(), Default::default(), std::sync::Arc::new(EventBus::default())).unwrap();
    let earlier = Node::this_process("serve", "0.0.0", Capabilities::any());
    q.register(&earlier, Duration::from_secs(600), None).await.unwrap();
    let cfg =
        Config::parse("[backends.instant]\nkind = \"echo\"\n[types.general]\nbackend = \"instant\"\n", "test").unwrap();
    let k = Koubou::start(cfg, &home, StartOptions::default()).await.unwrap();
    let nodes = q.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_ne!(nodes[0].instance, earlier.instance, "the earlier run's registration was taken over");
    assert_eq!(nodes[0].capabilities.kinds.as_ref().map(Vec::len), Some(2), "general and code: {nodes:?}");
    k.shutdown(Some(Duration::from_secs(1))).await;
    assert!(q.nodes().await.unwrap().is_empty(), "a clean stop deregisters");
}
