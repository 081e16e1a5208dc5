//! Tracking WebSocket frames through one direction of a TCP byte stream.
//!
//! [`StreamState`] is the whole state of one direction, kept in a kernel map, and
//! [`StreamState::step`] is the one function that moves it forward. The kernel programs run it
//! over each segment's payload as it passes; the agent's tests and fuzz target run the very same
//! code over byte slices, so what is tested is what runs in the kernel.
//!
//! A direction starts in [`Phase::Headers`]: the bytes are the HTTP request or response, and the
//! tracker only looks for the blank line (`\r\n\r\n`) that ends it. From there on the bytes are
//! frames (RFC 6455 §5.2): the tracker reads each header — possibly split across segments,
//! anywhere, even inside the extended length or the mask key — and skips the payload by its
//! length without reading it. The only payload bytes ever read are the two-byte status code at
//! the start of a close frame.
//!
//! Every step does a bounded amount of work and reads at most [`MAX_HEADER`] bytes, so the
//! kernel can drive it from `bpf_loop` and the verifier checks it once.

/// Longest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask key.
pub const MAX_HEADER: usize = 14;

/// Farthest ahead of the next expected byte, and longest, that a reordered range may be and
/// still be waited for; beyond, bytes are taken as never to be seen here.
pub const PARK_LIMIT: u32 = 1 << 20;

/// Upper bounds of the message-size buckets, in bytes; a last bucket holds larger messages.
pub const MESSAGE_SIZE_BOUNDS: [u64; 10] =
    [64, 256, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];

/// Number of message-size buckets, the last one unbounded.
pub const MESSAGE_SIZE_BUCKETS: usize = MESSAGE_SIZE_BOUNDS.len() + 1;

/// Frame kinds counted in [`StreamState::frames`], by index.
pub mod kind {
    pub const CONTINUATION: usize = 0;
    pub const TEXT: usize = 1;
    pub const BINARY: usize = 2;
    pub const CLOSE: usize = 3;
    pub const PING: usize = 4;
    pub const PONG: usize = 5;
    pub const COUNT: usize = 6;
    /// Names as exported in metrics.
    pub const NAMES: [&str; COUNT] = ["continuation", "text", "binary", "close", "ping", "pong"];
}

/// RFC 6455 opcodes.
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Where a direction's tracking stands (`StreamState::phase`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Inside the HTTP header block.
    Headers = 0,
    /// At or inside frames.
    Frames = 1,
    /// Some bytes were never seen: frame boundaries are unknown.
    Lost = 2,
    /// Not tracked.
    Off = 3,
}

/// `StreamState::flags` bits.
pub mod stream_flags {
    /// A fragmented data message is in progress (a data frame without FIN was seen).
    pub const IN_MESSAGE: u8 = 1 << 0;
    /// Frames in this direction must be masked (client to server).
    pub const EXPECT_MASKED: u8 = 1 << 1;
    /// A close frame was seen in this direction.
    pub const CLOSE_SEEN: u8 = 1 << 2;
    /// Dry run after lost tracking: check that headers are plausible, count nothing.
    pub const PROBE: u8 = 1 << 3;
    /// The dry run met something no real frame header would be.
    pub const PROBE_FAILED: u8 = 1 << 4;
    /// Tracking resumed at a frame boundary: whether a message was in progress is unknown
    /// until the next final data frame.
    pub const RESUMED: u8 = 1 << 5;
    /// The stream's start is unknown (a connection already open when tracking began): the
    /// first segment seen places it.
    pub const UNPLACED: u8 = 1 << 6;
}

/// Where a segment falls relative to what a direction already tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Every byte was tracked already (a retransmission).
    Old,
    /// Bytes before this segment were never seen.
    Gap,
    /// The segment arrived ahead of bytes not seen yet (reordered): its range is remembered,
    /// not its bytes, and it is passed over once the hole fills if it holds payload only.
    Parked,
    /// New bytes start `skip` bytes into the segment.
    New { skip: u32 },
}

/// One frame header, as reported by [`StreamState::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits.
    pub rsv: u8,
    pub masked: bool,
    pub payload_len: u64,
    /// For close frames: the status code, 1005 when the frame carries none. Zero otherwise.
    pub close_code: u16,
}

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Progress was made; call again.
    More,
    /// The segment is used up, or this direction is not tracked.
    Done,
    /// A frame header completed (for a close frame: its status code too); call again.
    Frame(Frame),
}

/// Reads bytes of the segment being tracked.
pub trait Source {
    /// Fills `dst` with the bytes at `at`; false if they cannot be read.
    fn read(&self, at: u32, dst: &mut [u8]) -> bool;
}

/// Bytes already in memory: what the agent's tests and the fuzz target track.
impl Source for [u8] {
    fn read(&self, at: u32, dst: &mut [u8]) -> bool {
        let at = at as usize;
        match self.get(at..at.saturating_add(dst.len())) {
            Some(bytes) => {
                dst.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }
}

/// Where the tracker is inside the current segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Position of the next byte to look at.
    pub pos: u32,
    /// Position just past the segment's last byte.
    pub end: u32,
}

impl Cursor {
    const fn left(&self) -> u32 {
        self.end.saturating_sub(self.pos)
    }
}

/// The state of one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Payload bytes of the current frame not yet passed.
    pub payload_left: u64,
    /// Payload bytes of the current (possibly fragmented) data message so far.
    pub message_bytes: u64,
    /// Payload bytes of all completed data messages.
    pub message_bytes_total: u64,
    /// When the last frame header completed (`CLOCK_MONOTONIC` ns).
    pub last_frame_ns: u64,
    /// When the last data frame header completed.
    pub last_data_ns: u64,
    /// Stream offset of the next byte to track; the kernel driver keeps it.
    pub next_offset: u32,
    /// Frames seen, by [`kind`].
    pub frames: [u32; kind::COUNT],
    /// Completed data messages by size, buckets bounded by [`MESSAGE_SIZE_BOUNDS`].
    pub message_sizes: [u32; MESSAGE_SIZE_BUCKETS],
    /// Times tracking was lost (bytes never seen, or a length no stream can carry).
    pub lost: u32,
    /// Frames breaking RFC 6455 framing rules (reserved opcode, fragmented or oversized
    /// control frame, wrong masking, continuation without a message).
    pub violations: u32,
    /// Status code of the first close frame; 0 before one is seen.
    pub close_code: u16,
    /// [`Phase`] as its discriminant.
    pub phase: u8,
    /// Bits from [`stream_flags`].
    pub flags: u8,
    /// Progress through `\r\n\r\n` while in [`Phase::Headers`].
    pub matched: u8,
    /// Header bytes gathered in `header` while a header is split across segments.
    pub header_len: u8,
    /// Close-code bytes still to read from the current close frame's payload.
    pub capture: u8,
    pub _pad: u8,
    pub header: [u8; MAX_HEADER],
    /// Mask key of the current frame (unmasks the close code).
    pub mask: [u8; 4],
    pub _pad2: [u8; 2],
    /// Frames with RSV1 set: compressed messages, legitimate only when `permessage-deflate` was
    /// negotiated (the kernel cannot know; the agent judges).
    pub rsv1_frames: u32,
    /// Range of stream offsets `[start, end)` that arrived ahead of a hole; empty when equal.
    pub parked: [u32; 2],
}

const _: () = assert!(core::mem::size_of::<StreamState>() == 160);

/// Header size announced by the first two header bytes.
const fn header_size(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

/// Whether a header could belong to a real stream in this direction: a defined opcode, the
/// masking the direction requires, control frames whole and short, only RSV1 (compression) and
/// only on data frames.
fn plausible(frame: &Frame, expect_masked: bool) -> bool {
    let control = frame.opcode >= opcode::CLOSE;
    let defined = matches!(
        frame.opcode,
        opcode::CONTINUATION
            | opcode::TEXT
            | opcode::BINARY
            | opcode::CLOSE
            | opcode::PING
            | opcode::PONG
    );
    let rsv_ok = frame.rsv == 0 || (frame.rsv == 0b100 && !control);
    defined
        && frame.masked == expect_masked
        && rsv_ok
        && (!control || (frame.fin && frame.payload_len <= 125))
}

/// Index of the message-size bucket for `size`.
pub fn size_bucket(size: u64) -> usize {
    let mut i = 0;
    while i < MESSAGE_SIZE_BOUNDS.len() {
        if size <= MESSAGE_SIZE_BOUNDS[i] {
            return i;
        }
        i += 1;
    }
    MESSAGE_SIZE_BOUNDS.len()
}

impl StreamState {
    /// A direction that starts with HTTP headers; `client_to_server` frames must be masked.
    pub fn new(client_to_server: bool) -> Self {
        Self {
            flags: if client_to_server { stream_flags::EXPECT_MASKED } else { 0 },
            ..Self::default()
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase {
            0 => Phase::Headers,
            1 => Phase::Frames,
            2 => Phase::Lost,
            _ => Phase::Off,
        }
    }

    /// Places a segment of `len` bytes starting at `stream_offset` (both modulo 2^32, as TCP
    /// sequence numbers are).
    pub fn place(&mut self, stream_offset: u32, len: u32) -> Placement {
        if self.flags & stream_flags::UNPLACED != 0 {
            self.flags &= !stream_flags::UNPLACED;
            self.next_offset = stream_offset;
        }
        let end = stream_offset.wrapping_add(len);
        if end.wrapping_sub(self.next_offset) as i32 <= 0 {
            return Placement::Old;
        }
        if stream_offset.wrapping_sub(self.next_offset) as i32 <= 0 {
            return Placement::New { skip: self.next_offset.wrapping_sub(stream_offset) };
        }
        // Ahead of the next expected byte: reordered on the way (a sender moving between CPUs
        // reorders even loopback), or lost before this hook. Remember one contiguous range.
        if self.phase != Phase::Frames as u8 {
            return Placement::Gap;
        }
        let [start, parked_end] = self.parked;
        let near = |to: u32| to.wrapping_sub(self.next_offset) <= PARK_LIMIT;
        if start == parked_end && near(end) {
            self.parked = [stream_offset, end];
            Placement::Parked
        } else if start != parked_end && stream_offset == parked_end && near(end) {
            self.parked[1] = end;
            Placement::Parked
        } else if stream_offset.wrapping_sub(start) as i32 >= 0
            && parked_end.wrapping_sub(end) as i32 >= 0
        {
            Placement::Old
        } else {
            Placement::Gap
        }
    }

    /// After tracking up to `next_offset`: passes over a parked range the hole before it led
    /// up to, which is possible without its bytes only when it lies inside a frame's payload.
    pub fn unpark(&mut self) {
        let [start, end] = self.parked;
        if start == end || (self.next_offset.wrapping_sub(start) as i32) < 0 {
            return; // Nothing parked, or the hole is not filled yet.
        }
        self.parked = [0, 0];
        if end.wrapping_sub(self.next_offset) as i32 <= 0 {
            return; // Seen again since.
        }
        let ahead = end.wrapping_sub(self.next_offset);
        let inside_payload = self.phase == Phase::Frames as u8
            && self.header_len == 0
            && self.capture == 0
            && self.payload_left >= u64::from(ahead);
        if inside_payload {
            self.payload_left -= u64::from(ahead);
        } else {
            self.lose();
        }
        self.next_offset = end;
    }

    /// A copy to dry-run over a segment after tracking was lost: framing reset, counting off.
    pub fn probe_copy(&self) -> Self {
        let mut probe = *self;
        probe.start_probe();
        probe
    }

    /// The state of a direction of a connection already open when tracking began: frame
    /// boundaries unknown until a dry run finds one.
    pub fn adopted(client_to_server: bool) -> Self {
        let mut state = Self::new(client_to_server);
        state.phase = Phase::Lost as u8;
        state.flags |= stream_flags::UNPLACED;
        state
    }

    /// Turns this state, a copy of a lost one, into the dry run of [`Self::probe_copy`].
    pub fn start_probe(&mut self) {
        self.phase = Phase::Frames as u8;
        self.payload_left = 0;
        self.header_len = 0;
        self.capture = 0;
        self.matched = 0;
        self.flags = (self.flags & stream_flags::EXPECT_MASKED) | stream_flags::PROBE;
    }

    /// After a dry run over a segment from its start: whether that start is a frame boundary
    /// beyond reasonable doubt: two plausible headers chained by their lengths, or one that
    /// ends exactly with the segment.
    pub fn probe_passed(&self) -> bool {
        self.flags & stream_flags::PROBE_FAILED == 0
            && self.phase == Phase::Frames as u8
            && (self.matched >= 2
                || (self.matched == 1 && self.payload_left == 0 && self.header_len == 0))
    }

    /// Resumes tracking at a frame boundary, after a dry run passed there.
    pub fn resume(&mut self) {
        self.phase = Phase::Frames as u8;
        self.payload_left = 0;
        self.header_len = 0;
        self.capture = 0;
        self.message_bytes = 0;
        self.flags = (self.flags & !stream_flags::IN_MESSAGE) | stream_flags::RESUMED;
    }

    /// Marks the direction lost: its frame boundaries are unknown from here on.
    pub fn lose(&mut self) {
        self.parked = [0, 0];
        if self.phase == Phase::Headers as u8 || self.phase == Phase::Frames as u8 {
            self.lost += 1;
            self.phase = Phase::Lost as u8;
        }
    }

    /// Moves the tracker forward over bytes of `src` from `cursor.pos` to `cursor.end`.
    /// One call does a bounded amount of work; call it until it returns [`Step::Done`].
    #[inline(always)]
    pub fn step<S: Source + ?Sized>(&mut self, src: &S, cursor: &mut Cursor, now_ns: u64) -> Step {
        if cursor.pos >= cursor.end {
            return Step::Done;
        }
        if self.phase == Phase::Headers as u8 {
            return self.scan_headers(src, cursor);
        }
        if self.phase != Phase::Frames as u8 {
            return Step::Done;
        }
        if self.capture > 0 {
            return self.capture_close_code(src, cursor);
        }
        if self.payload_left > 0 {
            let skip = if self.payload_left < cursor.left() as u64 {
                self.payload_left as u32
            } else {
                cursor.left()
            };
            cursor.pos += skip;
            self.payload_left -= skip as u64;
            return Step::More;
        }
        self.read_header(src, cursor, now_ns)
    }

    /// Looks for the blank line ending the HTTP header block, one byte per step: each step has
    /// few branches, which keeps the verifier's view of the loop small.
    #[inline(always)]
    fn scan_headers<S: Source + ?Sized>(&mut self, src: &S, cursor: &mut Cursor) -> Step {
        let mut byte = [0u8; 1];
        if !src.read(cursor.pos, &mut byte) {
            self.lose();
            return Step::Done;
        }
        cursor.pos += 1;
        let expected = if self.matched & 1 == 0 { b'\r' } else { b'\n' };
        self.matched = if byte[0] == expected {
            self.matched + 1
        } else if byte[0] == b'\r' {
            1
        } else {
            0
        };
        if self.matched == 4 {
            self.matched = 0;
            self.phase = Phase::Frames as u8;
        }
        Step::More
    }

    /// Reads the two status-code bytes at the start of a close frame's payload, one per step.
    #[inline(always)]
    fn capture_close_code<S: Source + ?Sized>(&mut self, src: &S, cursor: &mut Cursor) -> Step {
        let mut byte = [0u8; 1];
        if !src.read(cursor.pos, &mut byte) {
            self.lose();
            return Step::Done;
        }
        let index = (2 - self.capture.min(2)) as usize;
        let unmasked = byte[0] ^ self.mask[index & 3];
        self.close_code = if index == 0 {
            u16::from(unmasked) << 8
        } else {
            self.close_code | u16::from(unmasked)
        };
        self.capture -= 1;
        cursor.pos += 1;
        self.payload_left -= 1;
        if self.capture > 0 {
            return Step::More;
        }
        Step::Frame(Frame {
            opcode: opcode::CLOSE,
            fin: true,
            rsv: 0,
            masked: self.mask != [0; 4],
            payload_len: self.payload_left + 2,
            close_code: self.close_code,
        })
    }

    /// Gathers and parses one frame header.
    #[inline(always)]
    fn read_header<S: Source + ?Sized>(
        &mut self,
        src: &S,
        cursor: &mut Cursor,
        now_ns: u64,
    ) -> Step {
        let mut h = [0u8; MAX_HEADER];
        let have;
        // Whether the header's bytes still lie ahead of the cursor.
        let ahead;
        if self.header_len == 0 && cursor.left() >= MAX_HEADER as u32 {
            // Whole header in this segment (the usual case): one read.
            if !src.read(cursor.pos, &mut h) {
                self.lose();
                return Step::Done;
            }
            have = MAX_HEADER;
            ahead = true;
        } else {
            // A header split across segments: gather it byte by byte.
            let at = (self.header_len as usize).min(MAX_HEADER - 1);
            let mut byte = [0u8; 1];
            if !src.read(cursor.pos, &mut byte) {
                self.lose();
                return Step::Done;
            }
            self.header[at] = byte[0];
            self.header_len = at as u8 + 1;
            cursor.pos += 1;
            let needed = if self.header_len >= 2 { header_size(self.header[1]) } else { 2 };
            if (self.header_len as usize) < needed {
                return Step::More;
            }
            h = self.header;
            have = self.header_len as usize;
            self.header_len = 0;
            ahead = false;
        }

        let size = header_size(h[1]);
        if have < size {
            // Only possible on the fast path's fixed read, which always covers a header.
            self.lose();
            return Step::Done;
        }
        let payload_len = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            len => u64::from(len),
        };
        if ahead {
            cursor.pos += size as u32;
        }
        let masked = h[1] & 0x80 != 0;
        self.mask = match (masked, size) {
            (false, _) => [0; 4],
            (true, 6) => [h[2], h[3], h[4], h[5]],
            (true, 8) => [h[4], h[5], h[6], h[7]],
            (true, _) => [h[10], h[11], h[12], h[13]],
        };
        let frame = Frame {
            opcode: h[0] & 0x0f,
            fin: h[0] & 0x80 != 0,
            rsv: (h[0] >> 4) & 0x07,
            masked,
            payload_len,
            close_code: 0,
        };
        if payload_len >> 63 != 0 && self.flags & stream_flags::PROBE != 0 {
            self.flags |= stream_flags::PROBE_FAILED;
            return Step::Done;
        }
        if payload_len >> 63 != 0 {
            // RFC 6455: the most significant bit must be 0. No stream can carry this length,
            // so the boundaries that follow are meaningless.
            self.violations += 1;
            self.lose();
            return Step::Done;
        }
        self.payload_left = payload_len;
        if self.flags & stream_flags::PROBE != 0 {
            if plausible(&frame, self.flags & stream_flags::EXPECT_MASKED != 0) {
                self.matched = self.matched.saturating_add(1);
                return Step::More;
            }
            self.flags |= stream_flags::PROBE_FAILED;
            return Step::Done;
        }
        self.account(&frame, now_ns);

        if frame.opcode == opcode::CLOSE && self.flags & stream_flags::CLOSE_SEEN == 0 {
            self.flags |= stream_flags::CLOSE_SEEN;
            if payload_len >= 2 {
                self.capture = 2;
                return Step::More;
            }
            self.close_code = 1005;
            return Step::Frame(Frame { close_code: 1005, ..frame });
        }
        Step::Frame(frame)
    }

    /// Counts a frame and checks it against the framing rules.
    #[inline(always)]
    fn account(&mut self, frame: &Frame, now_ns: u64) {
        self.last_frame_ns = now_ns;
        if frame.rsv & 0b100 != 0 {
            self.rsv1_frames += 1;
        }
        let expect_masked = self.flags & stream_flags::EXPECT_MASKED != 0;
        if frame.masked != expect_masked {
            self.violations += 1;
        }
        let in_message = self.flags & stream_flags::IN_MESSAGE != 0;
        let index = match frame.opcode {
            opcode::CONTINUATION => kind::CONTINUATION,
            opcode::TEXT => kind::TEXT,
            opcode::BINARY => kind::BINARY,
            opcode::CLOSE => kind::CLOSE,
            opcode::PING => kind::PING,
            opcode::PONG => kind::PONG,
            _ => {
                self.violations += 1;
                return;
            }
        };
        self.frames[index] += 1;
        if index >= kind::CLOSE {
            if !frame.fin || frame.payload_len > 125 {
                self.violations += 1;
            }
            return;
        }

        self.last_data_ns = now_ns;
        // Right after resuming, whether a message was in progress is unknown.
        let sure = self.flags & stream_flags::RESUMED == 0;
        if index == kind::CONTINUATION {
            if !in_message && sure {
                self.violations += 1;
            }
            self.message_bytes += frame.payload_len;
        } else {
            if in_message && sure {
                // A new message before the last one finished.
                self.violations += 1;
            }
            self.message_bytes = frame.payload_len;
        }
        if frame.fin {
            self.flags &= !(stream_flags::IN_MESSAGE | stream_flags::RESUMED);
            self.message_sizes[size_bucket(self.message_bytes).min(MESSAGE_SIZE_BUCKETS - 1)] += 1;
            self.message_bytes_total += self.message_bytes;
            self.message_bytes = 0;
        } else {
            self.flags |= stream_flags::IN_MESSAGE;
        }
    }

    /// Completed data messages.
    pub fn messages(&self) -> u64 {
        let mut n = 0u64;
        let mut i = 0;
        while i < MESSAGE_SIZE_BUCKETS {
            n += self.message_sizes[i] as u64;
            i += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// Encodes one frame; `mask` masks the payload as a client does.
    fn frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | op];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xffff => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    /// Feeds `stream` split into segments at `cuts`, and returns the frames reported.
    fn track(state: &mut StreamState, stream: &[u8], cuts: &[usize]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < stream.len()));
        bounds.push(stream.len());
        bounds.sort_unstable();
        bounds.dedup();
        for pair in bounds.windows(2) {
            // Each segment is a fresh buffer, as a new skb would be.
            let segment = &stream[pair[0]..pair[1]];
            let mut cursor = Cursor { pos: 0, end: segment.len() as u32 };
            let mut steps = 0;
            loop {
                steps += 1;
                assert!(steps < 100_000, "no progress");
                match state.step(segment, &mut cursor, 7) {
                    Step::More => {}
                    Step::Done => break,
                    Step::Frame(f) => frames.push(f),
                }
            }
        }
        frames
    }

    fn frames_state() -> StreamState {
        StreamState { phase: Phase::Frames as u8, ..StreamState::new(false) }
    }

    fn summary(frames: &[Frame]) -> Vec<(u8, bool, u64, u16)> {
        frames.iter().map(|f| (f.opcode, f.fin, f.payload_len, f.close_code)).collect()
    }

    #[test]
    fn finds_the_end_of_headers_and_the_pipelined_first_frame() {
        let mut stream = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nX: a\r\r\n\r\n".to_vec();
        stream.extend(frame(true, opcode::TEXT, b"hello", Some([1, 2, 3, 4])));
        for cut in 0..stream.len() {
            let mut s = StreamState::new(true);
            let frames = track(&mut s, &stream, &[cut]);
            assert_eq!(summary(&frames), [(opcode::TEXT, true, 5, 0)], "cut at {cut}");
            assert_eq!((s.violations, s.lost, s.messages()), (0, 0, 1));
        }
    }

    #[test]
    fn every_length_encoding_is_exact() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 20, 16 << 20] {
            let payload = vec![0x5a; len];
            let mut stream = frame(true, opcode::BINARY, &payload, None);
            stream.extend(frame(true, opcode::PING, b"p", None));
            let mut s = frames_state();
            let frames = track(&mut s, &stream, &[1, 3, 9, len / 2 + 2, stream.len() - 3]);
            assert_eq!(
                summary(&frames),
                [(opcode::BINARY, true, len as u64, 0), (opcode::PING, true, 1, 0)],
                "length {len}"
            );
            assert_eq!(s.message_bytes_total, len as u64);
            assert_eq!(s.message_sizes[size_bucket(len as u64)], 1);
            assert_eq!((s.violations, s.lost), (0, 0));
        }
    }

    #[test]
    fn splits_anywhere_including_inside_length_and_mask_give_the_same_frames() {
        let mut stream = Vec::new();
        stream.extend(frame(true, opcode::TEXT, &[b'a'; 300], Some([9, 8, 7, 6])));
        stream.extend(frame(true, opcode::BINARY, &[0; 70000], Some([1, 1, 1, 1])));
        stream.extend(frame(true, opcode::PONG, b"", Some([0, 0, 0, 1])));
        let mut expected = frames_state();
        expected.flags = stream_flags::EXPECT_MASKED;
        let want = summary(&track(&mut expected.clone(), &stream, &[]));
        assert_eq!(want.len(), 3);
        for cut in 0..40.min(stream.len()) {
            for second in [cut + 1, cut + 5, 310, 320, stream.len() - 1] {
                let mut s = expected;
                assert_eq!(
                    summary(&track(&mut s, &stream, &[cut, second])),
                    want,
                    "{cut}/{second}"
                );
                assert_eq!(s.violations, 0);
            }
        }
        // One byte per segment.
        let mut s = expected;
        let cuts: Vec<usize> = (1..stream.len()).step_by(1).take(400).collect();
        assert_eq!(summary(&track(&mut s, &stream, &cuts)), want);
    }

    #[test]
    fn many_frames_in_one_segment() {
        let mut stream = Vec::new();
        for i in 0..200u8 {
            stream.extend(frame(true, opcode::TEXT, &[i; 3], None));
        }
        let mut s = frames_state();
        assert_eq!(track(&mut s, &stream, &[]).len(), 200);
        assert_eq!(s.frames[kind::TEXT], 200);
        assert_eq!(s.messages(), 200);
    }

    #[test]
    fn control_frames_between_fragments_leave_one_message() {
        let mut stream = frame(false, opcode::TEXT, b"ab", None);
        stream.extend(frame(true, opcode::PING, b"x", None));
        stream.extend(frame(false, opcode::CONTINUATION, b"cd", None));
        stream.extend(frame(true, opcode::CONTINUATION, b"ef", None));
        let mut s = frames_state();
        let ops: Vec<u8> = track(&mut s, &stream, &[3]).iter().map(|f| f.opcode).collect();
        assert_eq!(ops, [1, 9, 0, 0]);
        assert_eq!((s.messages(), s.message_bytes_total, s.violations), (1, 6, 0));
        assert_eq!(s.frames[kind::PING], 1);
    }

    #[test]
    fn close_code_is_read_through_the_mask_even_when_split() {
        let stream =
            frame(true, opcode::CLOSE, &[0x03, 0xf3, b'b', b'y', b'e'], Some([5, 6, 7, 8]));
        for cut in 0..stream.len() {
            let mut s = StreamState { phase: Phase::Frames as u8, ..StreamState::new(true) };
            let frames = track(&mut s, &stream, &[cut]);
            assert_eq!(summary(&frames), [(opcode::CLOSE, true, 5, 1011)], "cut {cut}");
            assert_eq!(s.close_code, 1011);
        }
        let mut s = frames_state();
        let frames = track(&mut s, &frame(true, opcode::CLOSE, b"", None), &[]);
        assert_eq!(frames[0].close_code, 1005);
    }

    #[test]
    fn rule_breaking_frames_are_counted_as_violations() {
        let mut s = frames_state();
        track(&mut s, &frame(false, opcode::PING, b"", None), &[]);
        assert_eq!(s.violations, 1, "fragmented control frame");
        track(&mut s, &frame(true, 0x3, b"", None), &[]);
        assert_eq!(s.violations, 2, "reserved opcode");
        track(&mut s, &frame(true, opcode::CONTINUATION, b"", None), &[]);
        assert_eq!(s.violations, 3, "continuation without a message");
        track(&mut s, &frame(true, opcode::PING, &[0; 126], None), &[]);
        assert_eq!(s.violations, 4, "oversized control frame");

        let mut client = StreamState { phase: Phase::Frames as u8, ..StreamState::new(true) };
        track(&mut client, &frame(true, opcode::TEXT, b"hi", None), &[]);
        assert_eq!(client.violations, 1, "unmasked client frame");
    }

    #[test]
    fn a_length_with_the_top_bit_set_loses_tracking_without_phantoms() {
        let mut stream = vec![0x82, 127];
        stream.extend_from_slice(&u64::MAX.to_be_bytes());
        stream.extend(frame(true, opcode::PING, b"", None));
        let mut s = frames_state();
        assert!(track(&mut s, &stream, &[]).is_empty());
        assert_eq!((s.phase(), s.lost, s.violations), (Phase::Lost, 1, 1));
    }

    #[test]
    fn unreadable_bytes_lose_tracking() {
        struct Broken;
        impl Source for Broken {
            fn read(&self, _: u32, _: &mut [u8]) -> bool {
                false
            }
        }
        let mut s = frames_state();
        let mut cursor = Cursor { pos: 0, end: 10 };
        assert_eq!(s.step(&Broken, &mut cursor, 0), Step::Done);
        assert_eq!(s.phase(), Phase::Lost);
    }

    /// Drives a state over segments the way the kernel does: placed by offset, dry run after a
    /// loss. Returns the frames reported.
    fn drive(state: &mut StreamState, segments: &[(u32, &[u8])]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for &(offset, bytes) in segments {
            let skip = match state.place(offset, bytes.len() as u32) {
                Placement::Old | Placement::Parked => continue,
                Placement::Gap => {
                    state.lose();
                    0
                }
                Placement::New { skip } => skip,
            };
            let end = offset.wrapping_add(bytes.len() as u32);
            let run = |s: &mut StreamState, out: &mut Vec<Frame>| {
                let mut cursor = Cursor { pos: skip, end: bytes.len() as u32 };
                loop {
                    match s.step(bytes, &mut cursor, 1) {
                        Step::More => {}
                        Step::Done => break,
                        Step::Frame(f) => out.push(f),
                    }
                }
            };
            if state.phase() == Phase::Lost {
                let mut probe = state.probe_copy();
                run(&mut probe, &mut Vec::new());
                if probe.probe_passed() {
                    state.resume();
                }
            }
            run(state, &mut frames);
            state.next_offset = end;
            state.unpark();
        }
        frames
    }

    #[test]
    fn retransmissions_are_skipped_and_overlaps_trimmed() {
        let stream =
            [frame(true, opcode::TEXT, b"abc", None), frame(true, opcode::PING, b"", None)]
                .concat();
        let mut s = frames_state();
        let frames = drive(&mut s, &[(0, &stream[..4]), (0, &stream[..4]), (2, &stream[2..])]);
        assert_eq!(summary(&frames), [(opcode::TEXT, true, 3, 0), (opcode::PING, true, 0, 0)]);
        assert_eq!(s.lost, 0);
    }

    #[test]
    fn after_a_gap_tracking_resumes_at_a_clear_frame_boundary_without_phantoms() {
        let first = frame(true, opcode::BINARY, &[7; 3_000_000], None);
        let whole =
            [frame(true, opcode::TEXT, b"hello", None), frame(true, opcode::PONG, b"", None)]
                .concat();
        let stream = [first.clone(), whole.clone()].concat();
        let mut s = frames_state();
        // Bytes 10..2 000 000 of the first frame never arrive: too many to wait for.
        let seen_after_gap = &stream[2_000_000..first.len()];
        let frames = drive(
            &mut s,
            &[(0, &stream[..10]), (2_000_000, seen_after_gap), (first.len() as u32, &whole)],
        );
        // The binary header was seen before the gap; nothing is reported from the middle of its
        // payload; both whole frames after it are.
        assert_eq!(
            summary(&frames),
            [
                (opcode::BINARY, true, 3_000_000, 0),
                (opcode::TEXT, true, 5, 0),
                (opcode::PONG, true, 0, 0)
            ]
        );
        assert_eq!((s.lost, s.phase(), s.violations), (1, Phase::Frames, 0));
    }

    #[test]
    fn payload_that_looks_like_one_header_is_not_taken_for_a_boundary() {
        // After a gap, a segment of payload bytes that happen to start like a frame header whose
        // length runs past the segment: not enough evidence.
        let mut s = frames_state();
        let fake = [0x81u8, 0x7e, 0x10, 0x00, b'a', b'b'];
        let far = PARK_LIMIT * 2;
        let frames = drive(&mut s, &[(0, &[0x82, 0x7f, 0, 0, 0, 0, 0, 0x10, 0, 0]), (far, &fake)]);
        assert_eq!(summary(&frames), [(opcode::BINARY, true, 1 << 20, 0)], "only the real header");
        assert_eq!(s.phase(), Phase::Lost);
    }

    #[test]
    fn an_adopted_stream_is_placed_by_its_first_segment_and_resyncs() {
        let stream =
            [frame(true, opcode::TEXT, b"one", None), frame(true, opcode::TEXT, b"two", None)]
                .concat();
        let mut s = StreamState::adopted(false);
        let base = 3_000_000_000u32;
        let frames = drive(&mut s, &[(base, &stream[2..5]), (base + 3, &stream[5..])]);
        // The first segment starts mid-frame: nothing; the second starts on a boundary.
        assert_eq!(summary(&frames), [(opcode::TEXT, true, 3, 0)]);
        assert_eq!(s.phase(), Phase::Frames);
        assert_eq!(s.lost, 0, "an unknown start is not a loss");
    }

    #[test]
    fn segments_reordered_inside_a_payload_are_passed_over() {
        let stream =
            [frame(true, opcode::BINARY, &[1; 3000], None), frame(true, opcode::PING, b"", None)]
                .concat();
        // Payload only from 2000 to the end of the binary frame (4-byte header).
        let (a, b) = (&stream[..1000], &stream[1000..2000]);
        let (c, d) = (&stream[2000..3004], &stream[3004..]);
        let mut s = frames_state();
        // The second segment arrives after the third, and the third again later.
        let frames = drive(&mut s, &[(0, a), (2000, c), (1000, b), (2000, c), (3004, d)]);
        assert_eq!(summary(&frames), [(opcode::BINARY, true, 3000, 0), (opcode::PING, true, 0, 0)]);
        assert_eq!((s.lost, s.phase()), (0, Phase::Frames));
        assert_eq!(s.next_offset as usize, stream.len());
    }

    #[test]
    fn a_reordered_segment_holding_a_header_loses_tracking() {
        let stream =
            [frame(true, opcode::TEXT, b"aaaa", None), frame(true, opcode::TEXT, b"bbbb", None)]
                .concat();
        let mut s = frames_state();
        let frames = drive(&mut s, &[(0, &stream[..3]), (6, &stream[6..]), (3, &stream[3..6])]);
        assert_eq!(summary(&frames), [(opcode::TEXT, true, 4, 0)]);
        assert_eq!((s.lost, s.phase()), (1, Phase::Lost));
    }

    #[test]
    fn resuming_in_the_middle_of_a_message_is_not_a_violation() {
        let first = frame(false, opcode::TEXT, &[7; 3_000_000], None);
        let rest = [
            frame(true, opcode::CONTINUATION, b"end", None),
            frame(true, opcode::TEXT, b"x", None),
        ]
        .concat();
        let mut s = frames_state();
        // The rest of the first fragment is never seen; tracking resumes at its continuation.
        let frames = drive(&mut s, &[(0, &first[..10]), (first.len() as u32, &rest)]);
        assert_eq!(frames.len(), 3);
        assert_eq!((s.phase(), s.violations), (Phase::Frames, 0));
    }
}
