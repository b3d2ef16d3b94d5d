//! The Lua scripts: every operation that changes the queue is one script, run atomically by
//! Redis (`EVALSHA`, loaded again by the client after a `NOSCRIPT`). Each writing script is
//! `lua/prelude.lua` followed by its own file.

use ::redis::Script;

/// The operations that write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Submit,
    Claim,
    Heartbeat,
    Complete,
    Fail,
    Release,
    Cancel,
    RecoverNode,
    /// What a claim does first, alone.
    Housekeep,
    /// The claim of a given task (an outside dispatcher's delivery named it).
    ClaimId,
    /// Housekeeping, then the outbox's head.
    Outbox,
    /// Confirmed deliveries leave the outbox.
    Mark,
}

const PRELUDE: &str = include_str!("lua/prelude.lua");

pub struct Scripts {
    writes: Vec<(Op, Script)>,
    /// Reads only: a task's place in the claim order.
    pub position: Script,
    /// The node registry (`nodes.lua`: register, renew, deregister, expire).
    pub nodes: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let with_prelude = |op, body: &str| (op, Script::new(&format!("{PRELUDE}\n{body}")));
        Scripts {
            writes: vec![
                with_prelude(Op::Submit, include_str!("lua/submit.lua")),
                with_prelude(Op::Claim, include_str!("lua/claim.lua")),
                with_prelude(Op::Heartbeat, include_str!("lua/heartbeat.lua")),
                with_prelude(Op::Complete, include_str!("lua/complete.lua")),
                with_prelude(Op::Fail, include_str!("lua/fail.lua")),
                with_prelude(Op::Release, include_str!("lua/release.lua")),
                with_prelude(Op::Cancel, include_str!("lua/cancel.lua")),
                with_prelude(Op::RecoverNode, include_str!("lua/recover_node.lua")),
                with_prelude(Op::Housekeep, "housekeeping()\nreturn reply('ok', {})"),
                with_prelude(Op::ClaimId, include_str!("lua/claim_id.lua")),
                with_prelude(Op::Outbox, include_str!("lua/outbox.lua")),
                with_prelude(Op::Mark, include_str!("lua/mark.lua")),
            ],
            position: Script::new(include_str!("lua/position.lua")),
            nodes: Script::new(include_str!("lua/nodes.lua")),
        }
    }

    pub fn get(&self, op: Op) -> &Script {
        &self.writes.iter().find(|(o, _)| *o == op).expect("every op has a script").1
    }
}
