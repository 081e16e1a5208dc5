//! Fuzzes the frame tracker the kernel programs run: on any bytes, split into segments anywhere,
//! it never panics, never loops, and reports exactly the frames it reports on the same bytes in
//! one piece. The first input byte picks the direction and the phase; the next ones, the cuts.

#![no_main]

use libfuzzer_sys::fuzz_target;
use observer_common::frame::{Cursor, Frame, Phase, Step, StreamState};

fn run(mut state: StreamState, stream: &[u8], cuts: &[usize]) -> (Vec<Frame>, StreamState) {
    let mut frames = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    bounds.push(0);
    bounds.push(stream.len());
    bounds.sort_unstable();
    bounds.dedup();
    for pair in bounds.windows(2) {
        let segment = &stream[pair[0]..pair[1]];
        let mut cursor = Cursor { pos: 0, end: segment.len() as u32 };
        // Every step consumes a byte or reports a frame: far more steps than bytes is a loop.
        let mut done = false;
        for _ in 0..=segment.len() * 3 + 3 {
            match state.step(segment, &mut cursor, 1) {
                Step::More => {}
                Step::Done => {
                    done = true;
                    break;
                }
                Step::Frame(frame) => frames.push(frame),
            }
        }
        assert!(done, "no progress on a segment of {} bytes", segment.len());
    }
    (frames, state)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, stream) = data.split_at(4);
    let mut start = StreamState::new(head[0] & 1 != 0);
    if head[0] & 2 != 0 {
        start.phase = Phase::Frames as u8;
    }
    let cuts = [head[1] as usize * 7, head[2] as usize * 13, head[3] as usize];
    let (whole, whole_state) = run(start, stream, &[]);
    let (split, split_state) = run(start, stream, &cuts);
    assert_eq!(whole, split, "splitting changed the frames");
    assert_eq!(whole_state.frames, split_state.frames);
    assert_eq!(whole_state.violations, split_state.violations);
});
