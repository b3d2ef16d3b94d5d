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

/// A registration as stored, with its expiry from the sorted set.
fn stored(json: &str, expires_at: &str) -> Result<Node, QueueError> {
    let mut node: Node =
        serde_json::from_str(json).map_err(|e| QueueError::Corrupt(format!("a node's registration: {e}")))?;
    node.expires_at = expires_at.parse::<f64>().map_err(|e| QueueError::Corrupt(e.to_string()))? as Millis;
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
            [taken, held, exp] if taken == "taken" => Err(QueueError::NodeTaken(Box::new(stored(held, exp)?))),
            other => Err(QueueError::Corrupt(format!("register: Redis answered {other:?}"))),
        }
    }

    async fn renew(&self, id: &str, instance: u64, ttl: Duration) -> Result<bool, QueueError> {
        let answer = self.nodes_script(&["renew", id, &instance.to_string(), &ms(ttl)]).await?;
        Ok(answer.first().is_some_and(|a| a == "ok"))
    }

    async fn nodes(&self) -> Result<Vec<Node>, QueueError> {
        let (all, expiries): (Vec<(String, String)>, Vec<(String, String)>) = ::redis::pipe()
            .hgetall(self.key("nodes"))
            .zrange_withscores(self.key("node_exp"), 0, -1)
            .query_async(&mut self.conn())
            .await
            .map_err(from_redis)?;
        let mut nodes = Vec::with_capacity(all.len());
        for (id, json) in &all {
            if let Some((_, exp)) = expiries.iter().find(|(e, _)| e == id) {
                nodes.push(stored(json, exp)?);
            }
        }
        nodes.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
        Ok(nodes)
    }

    async fn expire(&self) -> Result<Vec<Node>, QueueError> {
        let answer = self.nodes_script(&["expire"]).await?;
        answer
            .chunks(2)
            .filter(|pair| pair.len() == 2 && !pair[0].is_empty())
            .map(|pair| stored(&pair[0], &pair[1]))
            .collect()
    }

    async fn deregister(&self, id: &str, instance: u64) -> Result<(), QueueError> {
        self.nodes_script(&["deregister", id, &instance.to_string()]).await.map(drop)
    }
}
