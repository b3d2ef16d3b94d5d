//! What tokens cost: a backend's prices, what it served, and what local backends spared a paid
//! API. Plain data shared by the router (which meters) and the service API (which shows it).

use serde::{Deserialize, Serialize};

use crate::Usage;

/// What a backend charges, per million tokens (in the currency of your price list; the docs
/// assume US dollars). Unset prices count as free.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(default)]
pub struct Prices {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_input_per_mtok: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_output_per_mtok: Option<f64>,
    /// Prompt tokens the provider served from its cache (unset: the input price).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_cached_input_per_mtok: Option<f64>,
}

impl Prices {
    /// True when any price is set.
    pub fn is_set(&self) -> bool {
        self.price_input_per_mtok.is_some()
            || self.price_output_per_mtok.is_some()
            || self.price_cached_input_per_mtok.is_some()
    }

    /// What `usage` costs at these prices.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let input = self.price_input_per_mtok.unwrap_or(0.0);
        let cached = self.price_cached_input_per_mtok.unwrap_or(input);
        let read = usage.cache_read_tokens.unwrap_or(0);
        let fresh = usage.prompt_tokens.saturating_sub(read);
        let cached_tokens = read.min(usage.prompt_tokens);
        (fresh as f64 * input
            + cached_tokens as f64 * cached
            + usage.completion_tokens as f64 * self.price_output_per_mtok.unwrap_or(0.0))
            / 1e6
    }

    /// Refuses negative or non-finite prices, naming the key.
    pub fn check(&self, table: &str) -> Result<(), String> {
        for (key, v) in [
            ("price_input_per_mtok", self.price_input_per_mtok),
            ("price_output_per_mtok", self.price_output_per_mtok),
            ("price_cached_input_per_mtok", self.price_cached_input_per_mtok),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("{table}: {key} must be a number >= 0, got {v}"));
            }
        }
        Ok(())
    }
}

/// Tokens and cost a backend served since start.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(default)]
pub struct MeterReading {
    /// Generations it completed (including answers a structured-output check then refused).
    #[schema(required = true)]
    pub answers: u64,
    #[schema(required = true)]
    pub prompt_tokens: u64,
    #[schema(required = true)]
    pub completion_tokens: u64,
    /// Of the prompt tokens, those read from the provider's prompt cache.
    #[schema(required = true)]
    pub cached_tokens: u64,
    /// At its configured prices (0 when it has none).
    #[schema(required = true)]
    pub cost: f64,
}

impl MeterReading {
    /// The same totals as one [`Usage`].
    pub fn usage(&self) -> Usage {
        Usage { cache_read_tokens: Some(self.cached_tokens), ..Usage::new(self.prompt_tokens, self.completion_tokens) }
    }
}

/// What the local backends spared a paid API: their tokens at the reference prices.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Spared {
    /// The `[pricing] reference` backend, if one is named.
    #[schema(required = true)]
    pub reference: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_from_usage_and_prices() {
        let p = Prices {
            price_input_per_mtok: Some(2.0),
            price_output_per_mtok: Some(10.0),
            price_cached_input_per_mtok: Some(0.5),
        };
        let u = Usage { cache_read_tokens: Some(200_000), ..Usage::new(1_000_000, 500_000) };
        // 800k fresh × 2 + 200k cached × 0.5 + 500k × 10, per million.
        assert!((p.cost(&u) - (1.6 + 0.1 + 5.0)).abs() < 1e-9);
        let no_cache_price = Prices { price_cached_input_per_mtok: None, ..p };
        assert!((no_cache_price.cost(&u) - (2.0 + 5.0)).abs() < 1e-9);
        assert_eq!(Prices::default().cost(&u), 0.0);
        assert!(
            Prices { price_input_per_mtok: Some(-1.0), ..Prices::default() }
                .check("t")
                .unwrap_err()
                .contains("price_input_per_mtok")
        );
    }
}
