//! `multipart/byteranges` (RFC 9110 §14.6): the answer to a GET asking for several ranges of a
//! blob in one request (`Range: bytes=a-b,c-d`), which a lazy read sends instead of one
//! request per range where the registry serves it ([`super::fetch`]).
//!
//! The body is the registry's, hence untrusted: each part's length is taken from its
//! `Content-Range` (never by searching its bytes for the boundary), every part must lie within
//! the blob and the body, and what the caller asked for must each lie within one part.

use super::fetch::parse_content_range;

/// At most this many parts are read from one body (a request asks for far fewer).
pub(crate) const MAX_PARTS: usize = 64;

/// The boundary of a `Content-Type: multipart/byteranges; boundary=...` value; `None` for
/// any other type or a boundary RFC 2046 does not allow (1 to 70 characters).
pub(crate) fn byteranges_boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    let b = params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then_some(v.trim())
    })?;
    let b = b
        .strip_prefix('"')
        .and_then(|b| b.strip_suffix('"'))
        .unwrap_or(b);
    (1..=70).contains(&b.len()).then_some(b)
}

/// One part: the blob's bytes `[start, start + len)` at `body[at..at + len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    pub(crate) start: u64,
    pub(crate) at: usize,
    pub(crate) len: usize,
}

/// The parts of `body`, a `multipart/byteranges` body with `boundary`, of a blob of
/// `blob_size` bytes. Errors say what is wrong and where in the body.
pub(crate) fn parse_byteranges(
    body: &[u8],
    boundary: &str,
    blob_size: u64,
) -> Result<Vec<Part>, String> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut parts = Vec::new();
    // The first delimiter may follow a preamble.
    let mut at = find(body, delim, 0).ok_or("no boundary in the body")? + delim.len();
    loop {
        if body[at..].starts_with(b"--") {
            return Ok(parts); // the close delimiter (an epilogue may follow)
        }
        if parts.len() == MAX_PARTS {
            return Err(format!("more than {MAX_PARTS} parts"));
        }
        at = skip_line_end(body, at).ok_or_else(|| format!("byte {at}: no line end"))?;
        let mut range = None;
        loop {
            let end = find(body, b"\r\n", at)
                .ok_or_else(|| format!("byte {at}: part headers do not end"))?;
            let line = &body[at..end];
            at = end + 2;
            if line.is_empty() {
                break;
            }
            let line = String::from_utf8_lossy(line);
            if let Some((k, v)) = line.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-range") {
                    range = parse_content_range(v);
                    if range.is_none() {
                        return Err(format!(
                            "part {}: Content-Range {:?}",
                            parts.len(),
                            v.trim()
                        ));
                    }
                }
            }
        }
        let (a, b, total) =
            range.ok_or_else(|| format!("part {}: no Content-Range", parts.len()))?;
        if a > b || b >= blob_size || total.is_some_and(|t| t != blob_size) {
            return Err(format!(
                "part {}: bytes {a}-{b}/{total:?} of a blob of {blob_size} bytes",
                parts.len()
            ));
        }
        let len = usize::try_from(b - a + 1).map_err(|_| "a part too long".to_string())?;
        if body.len() - at < len {
            return Err(format!(
                "part {}: {len} bytes at byte {at}, the body has {}",
                parts.len(),
                body.len() - at
            ));
        }
        parts.push(Part { start: a, at, len });
        at += len;
        // The next delimiter, after the line end that belongs to it.
        let next =
            find(body, delim, at).ok_or_else(|| format!("byte {at}: no boundary after a part"))?;
        if body[at..next].iter().any(|c| !c.is_ascii_whitespace()) {
            return Err(format!("byte {at}: {} bytes past a part's end", next - at));
        }
        at = next + delim.len();
    }
}

/// Where `ranges` (`(offset, len)` of the blob) are among `parts`: for each, the part and the
/// offset in the body it starts at; `Err` names the first range no part holds whole.
pub(crate) fn locate(parts: &[Part], ranges: &[(u64, usize)]) -> Result<Vec<usize>, String> {
    ranges
        .iter()
        .map(|&(off, len)| {
            parts
                .iter()
                .find(|p| p.start <= off && off + len as u64 <= p.start + p.len as u64)
                .map(|p| p.at + (off - p.start) as usize)
                .ok_or_else(|| format!("no part holds bytes {off}..{}", off + len as u64))
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| from + i)
}

/// Past the `\r\n` (or a bare `\n`, and any spaces before it) at `at`.
fn skip_line_end(body: &[u8], mut at: usize) -> Option<usize> {
    while body.get(at).is_some_and(|&c| c == b' ' || c == b'\t') {
        at += 1;
    }
    if body.get(at..at + 2) == Some(b"\r\n") {
        Some(at + 2)
    } else if body.get(at) == Some(&b'\n') {
        Some(at + 1)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body as Go's net/http writes it (docker-registry): no preamble, CRLFs.
    fn body(boundary: &str, parts: &[(u64, &[u8])], size: u64) -> Vec<u8> {
        let mut b = Vec::new();
        for (start, data) in parts {
            b.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Range: bytes {start}-{}/{size}\r\n\
                     Content-Type: application/octet-stream\r\n\r\n",
                    start + data.len() as u64 - 1
                )
                .as_bytes(),
            );
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        b
    }

    #[test]
    fn boundaries_from_content_types() {
        let b = byteranges_boundary("multipart/byteranges; boundary=e7ef5a74");
        assert_eq!(b, Some("e7ef5a74"));
        let quoted = byteranges_boundary("Multipart/ByteRanges;boundary=\"a b\"");
        assert_eq!(quoted, Some("a b"));
        assert_eq!(byteranges_boundary("application/octet-stream"), None);
        assert_eq!(byteranges_boundary("multipart/byteranges"), None);
        assert_eq!(byteranges_boundary("multipart/byteranges; boundary="), None);
        let long = format!("multipart/byteranges; boundary={}", "x".repeat(71));
        assert_eq!(byteranges_boundary(&long), None);
    }

    #[test]
    fn parts_are_found_by_their_content_range() {
        // The data holds the boundary itself: parts are cut by length, not by searching.
        let data1 = b"--XYZ\r\n--XYZ--".to_vec();
        let data2 = vec![7u8; 300];
        let b = body("XYZ", &[(5, &data1), (1000, &data2)], 5000);
        let parts = parse_byteranges(&b, "XYZ", 5000).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(&b[parts[0].at..parts[0].at + parts[0].len], &data1[..]);
        assert_eq!((parts[1].start, parts[1].len), (1000, 300));
        let at = locate(&parts, &[(1000, 300), (7, 3), (1100, 0)]).unwrap();
        assert_eq!(&b[at[1]..at[1] + 3], &data1[2..5]);
        assert_eq!(b[at[0]], 7);
        // A range no part holds whole.
        let e = locate(&parts, &[(1200, 101)]).unwrap_err();
        assert!(e.contains("1200..1301"), "{e}");
        // A preamble and an epilogue.
        let mut odd = b"preamble\r\n".to_vec();
        odd.extend_from_slice(&b);
        odd.extend_from_slice(b"epilogue");
        assert_eq!(parse_byteranges(&odd, "XYZ", 5000).unwrap().len(), 2);
    }

    #[test]
    fn bad_bodies_are_refused() {
        let data = vec![1u8; 100];
        let good = body("B", &[(0, &data)], 1000);
        let bad = |b: &[u8], size: u64| parse_byteranges(b, "B", size).unwrap_err();
        // A part past the blob, a total that is not the blob's, a truncated part.
        assert!(bad(&good, 50).contains("of a blob of 50"));
        assert!(bad(&body("B", &[(0, &data)], 999), 1000).contains("of a blob of 1000"));
        assert!(bad(&good[..good.len() - 8], 1000).contains("no boundary after a part"));
        assert!(bad(&good[..120], 1000).contains("the body has"));
        // No Content-Range, an unreadable one, no boundary at all, bytes after a part.
        assert!(bad(b"--B\r\nX: y\r\n\r\nabc\r\n--B--", 1000).contains("no Content-Range"));
        assert!(bad(b"--B\r\nContent-Range: bytes x/1\r\n\r\n", 1000).contains("Content-Range"));
        assert!(bad(b"nothing", 1000).contains("no boundary"));
        let mut extra = good.clone();
        extra.splice(good.len() - 9..good.len() - 9, *b"junk");
        assert!(bad(&extra, 1000).contains("past a part's end"));
        // Too many parts.
        let many: Vec<(u64, &[u8])> = (0..=MAX_PARTS as u64).map(|i| (i, &data[..1])).collect();
        assert!(bad(&body("B", &many, 1000), 1000).contains("more than"));
        // Every prefix of a good body fails cleanly or parses fewer parts.
        for n in 0..good.len() {
            let _ = parse_byteranges(&good[..n], "B", 1000);
        }
    }

    /// The fuzz target's entry on its seed, its prefixes and byte flips of it.
    #[test]
    fn the_fuzz_entry_on_its_seed() {
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/seeds/registry_byteranges/two-parts"
        ))
        .unwrap();
        assert_eq!(crate::fuzzing::registry_byteranges(&seed), Ok(2));
        for n in 0..seed.len() {
            let _ = crate::fuzzing::registry_byteranges(&seed[..n]);
            let mut m = seed.clone();
            m[n] ^= 0x5a;
            let _ = crate::fuzzing::registry_byteranges(&m);
        }
    }
}
