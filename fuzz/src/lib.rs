//! Shared helpers for the fuzz targets: every target parses, then reads everything the parser
//! exposes, within a byte budget so that no input can make one run allocate or read gigabytes.

use ovbd_format::source::read_exact_at;
use ovbd_format::{Error, LayerStack, LsmtFile, ReadAt};

/// The name every fuzzed source carries; errors about it must mention it.
pub const NAME: &str = "fuzz-input";

/// At most this many bytes are read from one disk or decompressed stream per run.
pub const BUDGET: u64 = 2 << 20;

/// Errors that come from reading the input must name it (the crate promises file + offset).
pub fn check_err(e: &Error) {
    if let Error::InvalidArgument(_) = e {
        return;
    }
    let msg = e.to_string();
    assert!(msg.contains(NAME), "error does not name the input: {msg}");
}

/// Reads `[0, min(size, budget))` of a source in uneven chunks, then its last bytes.
pub fn read_source(src: &dyn ReadAt, budget: u64) -> Result<(), Error> {
    let size = src.size();
    let mut buf = vec![0u8; 70_001];
    let mut pos = 0u64;
    let end = size.min(budget);
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        read_exact_at(src, &mut buf[..n], pos)?;
        pos += n as u64;
    }
    if size > end {
        let n = (size - end).min(4099) as usize;
        read_exact_at(src, &mut buf[..n], size - n as u64)?;
    }
    Ok(())
}

/// Stacks one layer and reads, within the budget: the start of the disk, every mapped range
/// (zeroed ones must read as zeros), and the last sectors of the virtual disk.
pub fn read_lsmt(lsmt: LsmtFile, budget: u64) -> Result<(), Error> {
    let stack = LayerStack::new(vec![lsmt])?;
    let vsize = stack.virtual_size();
    let mut left = budget;
    let mut buf = vec![0u8; 64 << 10];
    // The first sectors, as a kernel partition scan would.
    let head = vsize.min(36 << 10) / 512 * 512;
    stack.read(&mut buf[..head as usize], 0)?;
    left = left.saturating_sub(head);
    let segs = stack.index().segments().to_vec();
    for s in segs {
        if left == 0 {
            break;
        }
        let (mut pos, end) = (s.offset * 512, s.end() * 512);
        while pos < end && left > 0 {
            let n = (end - pos).min(buf.len() as u64).min(left) as usize / 512 * 512;
            if n == 0 {
                break;
            }
            stack.read(&mut buf[..n], pos)?;
            if s.zeroed {
                assert!(
                    buf[..n].iter().all(|&b| b == 0),
                    "zeroed mapping read non-zero"
                );
            }
            pos += n as u64;
            left -= n as u64;
        }
    }
    // The end of the disk: holes past every mapping, or the last mapping.
    if vsize >= 4096 {
        stack.read(&mut buf[..4096], vsize / 512 * 512 - 4096)?;
    }
    Ok(())
}
