//! The node registry in Redis: one script (`lua/nodes.lua`) per change, on Redis's clock, so
//! every node sharing the namespace sees every other and agrees on who expired.

use std::time::Duration;

use async_trait::async_trait;
use koubou_task::Millis;

use super::{RedisQueue, from_redis, json};
use crate::{Node, Nodes, QueueError};

impl RedisQueue {
    /// Runs `nodes.lua` with `args` (the action first).
    async fn nodes_script(&self, args: &[&str]) -> Result<Vec<String>, QueueError> {
        let mut call = self.inner.shared.scripts.nodes.key(&self.inner.shared.prefix);
        for a in args {
            call.arg(*a);
        }
        call.invoke_async(&mut self.conn()).await.map_err(from_redis)
    }
}

/// A registration as stored, with its expiry and last heartbeat from the sorted sets (a
/// registration made before `node_seen` existed was last seen when it started, as far as we know).
fn stored(json: &str, expires_at: &str, last_seen: Option<&str>) -> Result<Node, QueueError> {
    let mut node: Node =
        serde_json::from_str(json).map_err(|e| QueueError::Corrupt(format!("a node's registration: {e}")))?;
    let millis = |s: &str| s.parse::<f64>().map(|m| m as Millis).map_err(|e| QueueError::Corrupt(e.to_string()));
    node.expires_at = millis(expires_at)?;
    node.last_seen = match last_seen {
        Some(s) if s != "0" => millis(s)?,
        _ => node.started_at,
    };
    Ok(node)
}

fn ms(ttl: Duration) -> String {
    ttl.as_millis().max(1).to_string()
}

#[async_trait]
impl Nodes for RedisQueue {
    async fn register(&self, node: &Node, ttl: Duration, replace: Option<u64>) -> Result<(), QueueError> {
        let (instance, replace) = (node.instance.to_string(), replace.map(|r| r.to_string()).unwrap_or_default());
        let answer = self.nodes_script(&["register", &node.id, &instance, &ms(ttl), &replace, &json(node)?]).await?;
        match answer.as_slice() {
            [ok] if ok == "ok" => Ok(()),
            [taken, held, exp, seen] if taken == "taken" => {
                Err(QueueError::NodeTaken(Box::new(stored(held, exp, Some(seen))?)))
            }
            other => Err(QueueError::Corrupt(format!("register: Redis answered {other:?}"))),
        }
    }

    async fn renew(&self, node: &Node, ttl: Duration) -> Result<bool, QueueError> {
        let answer =
            self.nodes_script(&["renew", &node.id, &node.instance.to_string(), &ms(ttl), &json(node)?]).await?;
        Ok(answer.first().is_some_and(|a| a == "ok"))
    }

    async fn nodes(&self) -> Result<Vec<Node>, QueueError> {
        type Scores = Vec<(String, String)>;
        let (all, expiries, seen): (Vec<(String, String)>, Scores, Scores) = ::redis::pipe()
            .hgetall(self.key("nodes"))
            .zrange_withscores(self.key("node_exp"), 0, -1)
            .zrange_withscores(self.key("node_seen"), 0, -1)
            .query_async(&mut self.conn())
            .await
            .map_err(from_redis)?;
        let score = |scores: &Scores, id: &str| scores.iter().find(|(e, _)| e == id).map(|(_, s)| s.clone());
        let mut nodes = Vec::with_capacity(all.len());
        for (id, json) in &all {
            if let Some(exp) = score(&expiries, id) {
                nodes.push(stored(json, &exp, score(&seen, id).as_deref())?);
            }
        }
        nodes.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        Ok(nodes)
    }

    async fn expire(&self) -> Result<Vec<Node>, QueueError> {
        let answer = self.nodes_script(&["expire"]).await?;
        answer
            .chunks(3)
            .filter(|three| three.len() == 3 && !three[0].is_empty())
            .map(|three| stored(&three[0], &three[1], Some(&three[2])))
            .collect()
    }

    async fn deregister(&self, id: &str, instance: u64) -> Result<(), QueueError> {
        self.nodes_script(&["deregister", id, &instance.to_string()]).await.map(drop)
    }
}
