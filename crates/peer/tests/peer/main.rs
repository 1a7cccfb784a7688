//! Loopback tests of the peer server and RemoteReplica: in-process server on port 0, real
//! `LocalVolume`s on temp files behind real `Replica` fences, real TCP.

mod bad_input;
mod failures;
mod fencing;
mod harness;
mod round_trip;
mod sessions;
