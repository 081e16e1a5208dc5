//! Reading a whole hash map a few thousand entries per system call (`BPF_MAP_LOOKUP_BATCH`,
//! Linux 5.6), where walking it key by key takes two calls per entry: at every refresh the agent
//! reads all of `CONNS` and `FRAMES`, which hold an entry per connection end of the host.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `BPF_MAP_LOOKUP_BATCH` from `enum bpf_cmd` (UAPI `linux/bpf.h`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`: the UAPI layout, so it never changes.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Replaces the contents of `out` with every entry of the hash map behind `fd`, whose keys are
/// `K` and values `V` exactly as the map was created. `out` keeps its allocation from one call
/// to the next: a refresh reads about as many entries as the one before. An error means
/// nothing was read (the kernel lacks batch lookups, before 5.6, or refused): the caller falls
/// back to walking the map.
pub fn read_hash<K: aya::Pod + Default, V: aya::Pod + Default>(
    fd: BorrowedFd<'_>,
    out: &mut Vec<(K, V)>,
) -> io::Result<()> {
    out.clear();
    let mut chunk = CHUNK;
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // A hash map's position is a bucket index.
    let (mut position, mut next): (u32, u32) = (0, 0);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const position) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix for this command; the pointers in it
        // address buffers of `count` keys and values, and two `u32` positions, all alive and
        // exclusively borrowed for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let filled = (attr.count as usize).min(chunk);
        let done = if rc == 0 {
            false
        } else {
            match io::Error::last_os_error() {
                // The walk reached the end; this call's entries still count.
                e if e.raw_os_error() == Some(libc::ENOENT) => true,
                // One bucket holds more entries than asked for: nothing was copied, ask for more.
                e if e.raw_os_error() == Some(libc::ENOSPC) && filled == 0 => {
                    chunk *= 2;
                    keys.resize(chunk, K::default());
                    values.resize(chunk, V::default());
                    continue;
                }
                e => {
                    out.clear();
                    return Err(e);
                }
            }
        };
        out.extend(keys[..filled].iter().copied().zip(values[..filled].iter().copied()));
        if done {
            return Ok(());
        }
        position = next;
        first = false;
    }
}
