//! TODO: provider module (being written).
