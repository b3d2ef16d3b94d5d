//! Which tokens each sequence slot's KV cache holds, so that a new prompt starts in the slot that
//! already holds the longest prefix of it and only the rest is processed.
//!
//! A slot's KV cache is kept when its sequence ends (with `cache_prompts`): the next task that
//! shares a beginning with it — the same system prompt and chat template, a task asked again —
//! skips that part of the prompt. At least the prompt's last token is always processed again,
//! because its logits are what the first generated token is sampled from. The choice among free
//! slots: the one sharing the longest prefix when that covers at least half the prompt, else the
//! one used least recently (with whatever prefix it shares). So a prompt that shares little —
//! only the chat template's opening, say — does not overwrite a slot holding a long, useful
//! prefix while an older or empty slot is free; llama.cpp's server decides the same way.
//!
//! This module only keeps the books; the engine removes the KV cells past the reused prefix
//! (`llama_memory_seq_rm`) and forgets a slot whose cells it cleared.

use llama_cpp_2::token::LlamaToken;

/// The tokens at positions `0..len` of each slot's KV cache.
#[derive(Debug)]
pub struct PromptCache {
    enabled: bool,
    slots: Vec<Cached>,
    clock: u64,
}

#[derive(Debug, Default)]
struct Cached {
    tokens: Vec<LlamaToken>,
    last_used: u64,
}

/// Where a new prompt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub slot: usize,
    /// Tokens at the start of the prompt already in the slot's KV cache (positions
    /// `0..reuse`); the cells from `reuse` on must be removed before the rest is fed.
    pub reuse: usize,
}

impl PromptCache {
    /// Books for `slots` slots; with `enabled = false` nothing is ever reused.
    pub fn new(slots: usize, enabled: bool) -> PromptCache {
        PromptCache { enabled, slots: (0..slots).map(|_| Cached::default()).collect(), clock: 0 }
    }

    /// The free slot (`free(slot)`) for `prompt`, and how much of it that slot already holds.
    /// `None` when no slot is free. The slot's books are cut back to the reused prefix.
    pub fn place(&mut self, prompt: &[LlamaToken], free: impl Fn(usize) -> bool) -> Option<Placement> {
        // (slot, shared prefix) of the longest shared prefix, and of the least recently used.
        let mut longest: Option<(usize, usize)> = None;
        let mut oldest: Option<(usize, usize)> = None;
        for (id, c) in self.slots.iter().enumerate().filter(|(id, _)| free(*id)) {
            let shared = if self.enabled { common_prefix(&c.tokens, prompt) } else { 0 };
            if longest.is_none_or(|(_, s)| shared > s) {
                longest = Some((id, shared));
            }
            if oldest.is_none_or(|(o, _)| c.last_used < self.slots[o].last_used) {
                oldest = Some((id, shared));
            }
        }
        let (slot, shared) = longest.filter(|&(_, s)| s > 0 && 2 * s >= prompt.len()).or(oldest)?;
        // The last prompt token is fed again: its logits give the first generated token.
        let reuse = shared.min(prompt.len().saturating_sub(1));
        self.clock += 1;
        let c = &mut self.slots[slot];
        c.tokens.truncate(reuse);
        c.last_used = self.clock;
        Some(Placement { slot, reuse })
    }

    /// `tokens` are being fed to `slot` at the positions after those it holds.
    pub fn fed(&mut self, slot: usize, tokens: &[LlamaToken]) {
        if self.enabled {
            self.slots[slot].tokens.extend_from_slice(tokens);
        }
    }

    /// `slot`'s KV cells were cleared (or can no longer be trusted).
    pub fn forget(&mut self, slot: usize) {
        self.slots[slot].tokens.clear();
    }

    /// Tokens `slot` holds.
    #[cfg(test)]
    pub fn held(&self, slot: usize) -> usize {
        self.slots[slot].tokens.len()
    }
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: &[i32]) -> Vec<LlamaToken> {
        v.iter().map(|&t| LlamaToken::new(t)).collect()
    }

    #[test]
    fn a_prompt_goes_where_its_longest_prefix_is_and_its_last_token_is_fed_again() {
        let mut c = PromptCache::new(3, true);
        let all_free = |_| true;
        let a = c.place(&toks(&[1, 2, 3, 4]), all_free).unwrap();
        assert_eq!(a, Placement { slot: 0, reuse: 0 });
        c.fed(0, &toks(&[1, 2, 3, 4, 9, 9]));
        let b = c.place(&toks(&[7, 7]), all_free).unwrap();
        assert_eq!(b, Placement { slot: 1, reuse: 0 }, "an unrelated prompt leaves slot 0 alone");
        c.fed(1, &toks(&[7, 7]));
        // Shares 3 tokens with slot 0.
        assert_eq!(c.place(&toks(&[1, 2, 3, 5]), all_free).unwrap(), Placement { slot: 0, reuse: 3 });
        assert_eq!(c.held(0), 3, "the books are cut back to the reused prefix");
        c.fed(0, &toks(&[5]));
        // The same prompt again: everything but its last token is reused.
        assert_eq!(c.place(&toks(&[1, 2, 3, 5]), all_free).unwrap(), Placement { slot: 0, reuse: 3 });
        // A one-token prompt is always processed.
        assert_eq!(c.place(&toks(&[7]), all_free).unwrap().reuse, 0);
    }

    #[test]
    fn busy_slots_are_skipped_and_ties_go_to_the_least_recently_used() {
        let mut c = PromptCache::new(3, true);
        for (slot, t) in [(0, 10), (1, 11), (2, 12)] {
            assert_eq!(c.place(&toks(&[t]), |s| s == slot).unwrap().slot, slot);
            c.fed(slot, &toks(&[t]));
        }
        // Nothing shared anywhere: the least recently used free slot (0, then 1).
        assert_eq!(c.place(&toks(&[20, 21]), |_| true).unwrap().slot, 0);
        assert_eq!(c.place(&toks(&[20, 21]), |s| s != 0).unwrap().slot, 1);
        // No free slot.
        assert_eq!(c.place(&toks(&[20]), |_| false), None);
        // A busy slot holding the prefix is not chosen.
        c.fed(2, &toks(&[30, 31]));
        assert_eq!(c.held(2), 3);
        let p = c.place(&toks(&[12, 30, 31, 40]), |s| s != 2).unwrap();
        assert_eq!(p.reuse, 0);
    }

    #[test]
    fn a_prompt_sharing_little_takes_an_older_slot_not_the_one_holding_a_long_prefix() {
        let mut c = PromptCache::new(2, true);
        let long = toks(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(c.place(&long, |_| true).unwrap().slot, 0);
        c.fed(0, &long);
        // Shares 1 of 6 tokens with slot 0: goes to the empty slot 1.
        assert_eq!(c.place(&toks(&[1, 20, 21, 22, 23, 24]), |_| true).unwrap(), Placement { slot: 1, reuse: 0 });
        c.fed(1, &toks(&[1, 20, 21, 22, 23, 24]));
        // Slot 0 still holds the long prompt.
        assert_eq!(c.place(&long, |_| true).unwrap(), Placement { slot: 0, reuse: 7 });
        c.fed(0, &long[7..]);
        // Sharing little with both, the least recently used slot (1) is taken, reusing its token.
        assert_eq!(c.place(&toks(&[1, 30, 31, 32]), |_| true).unwrap(), Placement { slot: 1, reuse: 1 });
    }

    #[test]
    fn disabled_or_forgotten_reuses_nothing() {
        let mut off = PromptCache::new(1, false);
        off.place(&toks(&[1, 2, 3]), |_| true);
        off.fed(0, &toks(&[1, 2, 3]));
        assert_eq!(off.place(&toks(&[1, 2, 3]), |_| true).unwrap().reuse, 0);

        let mut on = PromptCache::new(1, true);
        on.place(&toks(&[1, 2, 3]), |_| true);
        on.fed(0, &toks(&[1, 2, 3]));
        on.forget(0);
        assert_eq!(on.place(&toks(&[1, 2, 3]), |_| true).unwrap().reuse, 0);
    }
}
