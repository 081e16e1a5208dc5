//! Fuzzes the agent's upgrade recogniser on the bytes the kernel copies: on any request and
//! response, cut into chunks anywhere and decided after every chunk as the agent does, it never
//! panics and reaches the decision it reaches on each side in one piece. The first input byte
//! picks where the request ends; the next three, the cuts.

#![no_main]

#[path = "../../observer/src/handshake.rs"]
#[allow(dead_code)]
mod handshake;

use handshake::{Handshake, Outcome};
use libfuzzer_sys::fuzz_target;

/// Feeds `request` then `response`, each cut at `cuts`, asking for the outcome after every
/// chunk; returns the first decision.
fn decide(request: &[u8], response: &[u8], cuts: &[usize]) -> Outcome {
    let mut handshake = Handshake::default();
    for (is_request, stream) in [(true, request), (false, response)] {
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        bounds.extend([0, stream.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        for pair in bounds.windows(2) {
            let (offset, chunk) = (pair[0] as u32, &stream[pair[0]..pair[1]]);
            if is_request {
                handshake.push_request(offset, chunk);
            } else {
                handshake.push_response(offset, chunk);
            }
            let outcome = handshake.outcome();
            if outcome != Outcome::Pending {
                return outcome;
            }
        }
    }
    handshake.outcome()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, rest) = data.split_at(4);
    let (request, response) = rest.split_at(head[0] as usize * rest.len() / 256);
    let cuts = [head[1] as usize * 3, head[2] as usize * 11, head[3] as usize];
    let whole = decide(request, response, &[]);
    let split = decide(request, response, &cuts);
    assert_eq!(whole, split, "cutting the bytes changed the decision");
});
