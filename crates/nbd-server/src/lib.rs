//! nbd-server (being written).
