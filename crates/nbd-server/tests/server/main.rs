//! In-process NBD server tests: a server on port 0 driven by raw protocol bytes (and, when
//! installed, by real clients).

mod devices;
mod handshake;
mod harness;
mod real_clients;
mod transmission;
