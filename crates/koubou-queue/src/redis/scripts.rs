//! The Lua code: every operation that changes the queue is one call of Lua, run atomically by
//! Redis. Each writing operation is `lua/prelude.lua` and its own file, in one of two forms:
//!
//! - a **library of Redis functions** (Redis 7 and later): loaded once (`FUNCTION LOAD`), its
//!   one function, `batch`, called with `FCALL` for a batch of operations (the writes waiting
//!   in the writer, in order, each with its own answer: `batch` in the prelude). The prelude's
//!   helpers are made once, at load, and a batch pays once for the call and its stream entry
//!   (measured in `docs/benchmarks.md`). Its name carries a hash of its text: nodes running
//!   different versions each call their own.
//! - **scripts** (`EVALSHA`, loaded again by the client after a `NOSCRIPT`), for a server
//!   without functions or a user not allowed to load them: the prelude before each body.

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
    /// Every pending task back in the outbox (the broker lost its deliveries).
    Redeliver,
}

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// Each operation, its name in the library, and its body.
const BODIES: [(Op, &str, &str); 13] = [
    (Op::Submit, "submit", include_str!("lua/submit.lua")),
    (Op::Claim, "claim", include_str!("lua/claim.lua")),
    (Op::Heartbeat, "heartbeat", include_str!("lua/heartbeat.lua")),
    (Op::Complete, "complete", include_str!("lua/complete.lua")),
    (Op::Fail, "fail", include_str!("lua/fail.lua")),
    (Op::Release, "release", include_str!("lua/release.lua")),
    (Op::Cancel, "cancel", include_str!("lua/cancel.lua")),
    (Op::RecoverNode, "recover_node", include_str!("lua/recover_node.lua")),
    (Op::Housekeep, "housekeep", "housekeeping(true)\nreturn reply('ok', {})"),
    (Op::ClaimId, "claim_id", include_str!("lua/claim_id.lua")),
    (Op::Outbox, "outbox", include_str!("lua/outbox.lua")),
    (Op::Mark, "mark", include_str!("lua/mark.lua")),
    (Op::Redeliver, "redeliver", include_str!("lua/redeliver.lua")),
];

pub struct Scripts {
    writes: Vec<(Op, Script)>,
    /// The library's source, for `FUNCTION LOAD REPLACE`.
    pub library: String,
    /// The library's function that runs a batch.
    pub batch: String,
    /// Reads only: a task's place in the claim order.
    pub position: Script,
    /// The node registry (`nodes.lua`: register, renew, deregister, expire).
    pub nodes: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let writes = BODIES
            .iter()
            .map(|(op, _, body)| (*op, Script::new(&format!("{PRELUDE}\ninit(KEYS, ARGV)\n{body}"))))
            .collect();
        // Named after a hash of everything it runs, so that a changed body is a new library.
        let source: String = BODIES.iter().fold(PRELUDE.to_owned(), |s, (_, _, body)| s + body);
        let name = format!("koubou_{}", &Script::new(&source).get_hash()[..16]);
        let mut library = format!("#!lua name={name}\n{PRELUDE}\nlocal OPS = {{}}\n");
        for (_, op, body) in BODIES {
            library.push_str(&format!("OPS['{op}'] = function(ARGV)\n{body}\nend\n"));
        }
        let batch = format!("{name}_batch");
        library.push_str(&format!(
            "redis.register_function('{batch}', function(KEYS, ARGV)\nreturn batch(KEYS, ARGV, OPS)\nend)\n"
        ));
        Scripts {
            writes,
            library,
            batch,
            position: Script::new(include_str!("lua/position.lua")),
            nodes: Script::new(include_str!("lua/nodes.lua")),
        }
    }

    /// The script of `op`.
    pub fn get(&self, op: Op) -> &Script {
        &self.writes.iter().find(|(o, _)| *o == op).expect("every op has a script").1
    }

    /// The name of `op` in a batch.
    pub fn name(op: Op) -> &'static str {
        BODIES.iter().find(|(o, _, _)| *o == op).expect("every op has a body").1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_a_script_and_a_place_in_the_library_named_after_its_text() {
        let s = Scripts::new();
        let name = s.library.lines().next().unwrap().strip_prefix("#!lua name=").unwrap().to_owned();
        assert_eq!(s.batch, format!("{name}_batch"));
        for (op, f, _) in BODIES {
            assert!(s.get(op).get_hash().len() == 40);
            assert_eq!(Scripts::name(op), f);
            assert!(s.library.contains(&format!("OPS['{f}'] = function(ARGV)")));
        }
        assert_eq!(Scripts::new().library, s.library, "the same text, the same name");
    }
}
