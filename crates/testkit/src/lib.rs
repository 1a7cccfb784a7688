//! testkit (being written).
