//! The structural rules of a map payload (docs/PROTOCOL.md, "Map"),
//! checked before serde sees it.

/// Checks that `payload` is exactly one well-formed MessagePack map whose
/// keys are all strings (valid UTF-8), each key once, with nothing after it,
/// nested at most [`MAX_DEPTH`] deep.
pub fn check_map(payload: &[u8]) -> Result<(), String> {
    let mut scan = Scanner {
        buf: payload,
        pos: 0,
    };
    let entries = match scan.byte()? {
        b @ 0x80..=0x8f => u64::from(b & 0x0f),
        0xde => u64::from(scan.be16()?),
        0xdf => u64::from(scan.be32()?),
        b => {
            return Err(format!(
                "payload is not a MessagePack map (first byte {b:#04x})"
            ))
        }
    };
    // The keys seen, as (offset, length) in the payload, to refuse
    // duplicates: sorted once at the end, so a hostile map of many keys
    // costs n log n, not n squared, and 8 bytes per key actually present
    // (not per key announced).
    let mut keys: Vec<(u32, u32)> = Vec::new();
    for _ in 0..entries {
        let len = match scan.byte() {
            Ok(b @ 0xa0..=0xbf) => usize::from(b & 0x1f),
            Ok(0xd9) => usize::from(scan.byte()?),
            Ok(0xda) => usize::from(scan.be16()?),
            Ok(0xdb) => scan.be32()? as usize,
            Ok(_) => return Err("a map key is not a string".to_owned()),
            Err(_) => return Err("payload ends inside the map".to_owned()),
        };
        let at = scan.pos;
        let key = scan.take(len)?;
        if std::str::from_utf8(key).is_err() {
            return Err("a map key is not valid UTF-8".to_owned());
        }
        let (Ok(at), Ok(len)) = (u32::try_from(at), u32::try_from(len)) else {
            return Err("payload too large".to_owned());
        };
        keys.push((at, len));
        scan.skip_value(1)?;
    }
    if scan.pos != payload.len() {
        return Err(format!("{} bytes after the map", payload.len() - scan.pos));
    }
    let key = |&(at, len): &(u32, u32)| &payload[at as usize..at as usize + len as usize];
    keys.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    if let Some(w) = keys.windows(2).find(|w| key(&w[0]) == key(&w[1])) {
        return Err(format!(
            "duplicate key `{}`",
            String::from_utf8_lossy(key(&w[0]))
        ));
    }
    Ok(())
}

/// A MessagePack walker that checks structure without building values.
struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// The deepest a map payload may nest containers (maps and arrays), the
/// payload map itself counting as the first level. Deeper is refused, so
/// a hostile payload cannot exhaust the stack.
pub const MAX_DEPTH: usize = 32;

impl<'a> Scanner<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| "payload ends inside a value".to_owned())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn be16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn be32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn skip(&mut self, n: usize) -> Result<(), String> {
        self.take(n).map(|_| ())
    }
    /// Skips the `n` items of a container found inside `depth` containers.
    fn skip_items(&mut self, n: u64, depth: usize) -> Result<(), String> {
        if depth + 1 > MAX_DEPTH {
            return Err(format!("containers nested more than {MAX_DEPTH} deep"));
        }
        for _ in 0..n {
            self.skip_value(depth + 1)?;
        }
        Ok(())
    }

    /// Skips one value found inside `depth` containers (the payload map
    /// counts as one).
    fn skip_value(&mut self, depth: usize) -> Result<(), String> {
        let b = self.byte()?;
        match b {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Ok(()),
            0x80..=0x8f => self.skip_items(2 * u64::from(b & 0x0f), depth),
            0x90..=0x9f => self.skip_items(u64::from(b & 0x0f), depth),
            0xa0..=0xbf => self.skip(usize::from(b & 0x1f)),
            0xc1 => Err("reserved MessagePack byte 0xc1".to_owned()),
            0xc4 | 0xd9 => {
                let n = self.byte()?;
                self.skip(usize::from(n))
            }
            0xc5 | 0xda => {
                let n = self.be16()?;
                self.skip(usize::from(n))
            }
            0xc6 | 0xdb => {
                let n = self.be32()?;
                self.skip(n as usize)
            }
            0xc7 => {
                let n = self.byte()?;
                self.skip(1 + usize::from(n))
            }
            0xc8 => {
                let n = self.be16()?;
                self.skip(1 + usize::from(n))
            }
            0xc9 => {
                let n = self.be32()?;
                self.skip(1)?;
                self.skip(n as usize)
            }
            0xca => self.skip(4),
            0xcb => self.skip(8),
            0xcc | 0xd0 => self.skip(1),
            0xcd | 0xd1 => self.skip(2),
            0xce | 0xd2 => self.skip(4),
            0xcf | 0xd3 => self.skip(8),
            0xd4 => self.skip(2),
            0xd5 => self.skip(3),
            0xd6 => self.skip(5),
            0xd7 => self.skip(9),
            0xd8 => self.skip(17),
            0xdc => {
                let n = self.be16()?;
                self.skip_items(u64::from(n), depth)
            }
            0xdd => {
                let n = self.be32()?;
                self.skip_items(u64::from(n), depth)
            }
            0xde => {
                let n = self.be16()?;
                self.skip_items(2 * u64::from(n), depth)
            }
            0xdf => {
                let n = self.be32()?;
                self.skip_items(2 * u64::from(n), depth)
            }
        }
    }
}
