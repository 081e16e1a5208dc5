//! Present so that the agent can name this crate as a build dependency and be rebuilt when the
//! kernel programs change; the programs themselves are the `observer` binary of this crate.
#![no_std]
