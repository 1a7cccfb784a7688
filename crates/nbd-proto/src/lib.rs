//! nbd-proto (being written).
