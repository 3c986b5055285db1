//! A small MessagePack reader and writer, independent of the crate's serde
//! types, so the tests check the agent's maps the way a host written in
//! another language would (key by key, type by type), and choose every
//! byte of what they send (integer widths, key types) instead of trusting
//! the encoder under test.
//!
//! - [`Value`] and [`decode`]: one value read whatever widths it uses, and
//!   written back in the smallest ones ([`Value::encode`]).
//! - [`mp`]: values built byte by byte, in the width the test names.

use std::fmt;

/// One MessagePack value.
#[derive(Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    /// Any integer, whatever width it was encoded with.
    Int(i128),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Ext(i8, Vec<u8>),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Nil => write!(f, "nil"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bin(b) => write!(f, "bin({} bytes)", b.len()),
            Value::Array(a) => f.debug_list().entries(a).finish(),
            Value::Map(m) => f
                .debug_map()
                .entries(m.iter().map(|(k, v)| (k, v)))
                .finish(),
            Value::Ext(t, b) => write!(f, "ext({t}, {} bytes)", b.len()),
        }
    }
}

impl Value {
    /// A map with string keys, from pairs.
    pub fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::Str(k.to_owned()), v))
                .collect(),
        )
    }

    pub fn str(s: &str) -> Value {
        Value::Str(s.to_owned())
    }

    pub fn int(i: impl Into<i128>) -> Value {
        Value::Int(i.into())
    }

    /// The value of string key `key` in a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(m) => m
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i128> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// Every key of a map, as strings (None for a non-string key).
    pub fn keys(&self) -> Vec<Option<&str>> {
        match self {
            Value::Map(m) => m.iter().map(|(k, _)| k.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    /// Encodes with the smallest width for each value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Nil => out.push(0xc0),
            Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            Value::Int(i) => put_int(*i, out),
            Value::Float(x) => {
                out.push(0xcb);
                out.extend_from_slice(&x.to_be_bytes());
            }
            Value::Str(s) => put_str(s.as_bytes(), out),
            Value::Bin(b) => put_bin(b, out),
            Value::Array(a) => {
                put_len(a.len(), [0x90, 0xdc, 0xdd], out);
                for v in a {
                    v.encode_into(out);
                }
            }
            Value::Map(m) => {
                put_len(m.len(), [0x80, 0xde, 0xdf], out);
                for (k, v) in m {
                    k.encode_into(out);
                    v.encode_into(out);
                }
            }
            Value::Ext(t, b) => {
                out.push(0xc7);
                out.push(b.len() as u8);
                out.push(*t as u8);
                out.extend_from_slice(b);
            }
        }
    }
}

/// An integer in its smallest encoding.
fn put_int(i: i128, out: &mut Vec<u8>) {
    if (0..128).contains(&i) {
        out.push(i as u8);
    } else if (-32..0).contains(&i) {
        out.push(i as i8 as u8);
    } else if i >= 0 {
        if i <= u8::MAX as i128 {
            out.push(0xcc);
            out.push(i as u8);
        } else if i <= u16::MAX as i128 {
            out.push(0xcd);
            out.extend_from_slice(&(i as u16).to_be_bytes());
        } else if i <= u32::MAX as i128 {
            out.push(0xce);
            out.extend_from_slice(&(i as u32).to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&(i as u64).to_be_bytes());
        }
    } else if i >= i8::MIN as i128 {
        out.push(0xd0);
        out.push(i as i8 as u8);
    } else if i >= i16::MIN as i128 {
        out.push(0xd1);
        out.extend_from_slice(&(i as i16).to_be_bytes());
    } else if i >= i32::MIN as i128 {
        out.push(0xd2);
        out.extend_from_slice(&(i as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&(i as i64).to_be_bytes());
    }
}

/// A `str` header in its smallest form, then the bytes.
fn put_str(b: &[u8], out: &mut Vec<u8>) {
    match b.len() {
        n @ 0..=31 => out.push(0xa0 | n as u8),
        n @ 32..=255 => out.extend_from_slice(&[0xd9, n as u8]),
        n @ 256..=65535 => {
            out.push(0xda);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0xdb);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(b);
}

/// A `bin` in its smallest form.
fn put_bin(b: &[u8], out: &mut Vec<u8>) {
    let n = b.len();
    if n < 256 {
        out.extend_from_slice(&[0xc4, n as u8]);
    } else if n < 65536 {
        out.push(0xc5);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(b);
}

/// An array or map header in its smallest form: `codes` are the fix
/// prefix, the 16-bit and the 32-bit code.
fn put_len(n: usize, codes: [u8; 3], out: &mut Vec<u8>) {
    if n < 16 {
        out.push(codes[0] | n as u8);
    } else if n < 65536 {
        out.push(codes[1]);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(codes[2]);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

/// MessagePack values, built byte by byte.
pub mod mp {
    pub fn nil() -> Vec<u8> {
        vec![0xc0]
    }
    pub fn bool(b: bool) -> Vec<u8> {
        vec![if b { 0xc3 } else { 0xc2 }]
    }
    /// positive fixint (0..=127)
    pub fn fix(n: u8) -> Vec<u8> {
        assert!(n < 0x80);
        vec![n]
    }
    /// negative fixint (-32..=-1)
    pub fn nfix(n: i8) -> Vec<u8> {
        assert!((-32..0).contains(&n));
        vec![n as u8]
    }
    pub fn u8(n: u8) -> Vec<u8> {
        vec![0xcc, n]
    }
    pub fn u16(n: u16) -> Vec<u8> {
        let mut v = vec![0xcd];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn u32(n: u32) -> Vec<u8> {
        let mut v = vec![0xce];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn u64(n: u64) -> Vec<u8> {
        let mut v = vec![0xcf];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn i8(n: i8) -> Vec<u8> {
        vec![0xd0, n as u8]
    }
    pub fn i16(n: i16) -> Vec<u8> {
        let mut v = vec![0xd1];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn i32(n: i32) -> Vec<u8> {
        let mut v = vec![0xd2];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn i64(n: i64) -> Vec<u8> {
        let mut v = vec![0xd3];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn f32(x: f32) -> Vec<u8> {
        let mut v = vec![0xca];
        v.extend_from_slice(&x.to_be_bytes());
        v
    }
    pub fn f64(x: f64) -> Vec<u8> {
        let mut v = vec![0xcb];
        v.extend_from_slice(&x.to_be_bytes());
        v
    }
    /// Every MessagePack encoding of the unsigned value `n` that fits it
    /// (fixint, u8, u16, u32, u64 and the signed forms i8..i64).
    pub fn uint_widths(n: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if n < 0x80 {
            out.push(fix(n as u8));
        }
        if let Ok(x) = u8::try_from(n) {
            out.push(u8(x));
        }
        if let Ok(x) = u16::try_from(n) {
            out.push(u16(x));
        }
        if let Ok(x) = u32::try_from(n) {
            out.push(u32(x));
        }
        out.push(u64(n));
        if let Ok(x) = i8::try_from(n) {
            out.push(i8(x));
        }
        if let Ok(x) = i16::try_from(n) {
            out.push(i16(x));
        }
        if let Ok(x) = i32::try_from(n) {
            out.push(i32(x));
        }
        if let Ok(x) = i64::try_from(n) {
            out.push(i64(x));
        }
        out
    }
    /// Every MessagePack encoding of the negative value `n` that fits it.
    pub fn nint_widths(n: i64) -> Vec<Vec<u8>> {
        assert!(n < 0);
        let mut out = Vec::new();
        if n >= -32 {
            out.push(nfix(n as i8));
        }
        if let Ok(x) = i8::try_from(n) {
            out.push(i8(x));
        }
        if let Ok(x) = i16::try_from(n) {
            out.push(i16(x));
        }
        if let Ok(x) = i32::try_from(n) {
            out.push(i32(x));
        }
        out.push(i64(n));
        out
    }
    /// A `str` in its smallest form.
    pub fn str(s: &str) -> Vec<u8> {
        let mut v = Vec::new();
        super::put_str(s.as_bytes(), &mut v);
        v
    }
    /// A `str` in the given width: 0 fixstr, 8, 16 or 32.
    pub fn str_w(s: &str, width: u8) -> Vec<u8> {
        let b = s.as_bytes();
        let max = match width {
            0 => 31,
            8 => 255,
            16 => 65535,
            32 => u32::MAX as usize,
            _ => panic!("no str width {width}"),
        };
        assert!(
            b.len() <= max,
            "{} bytes do not fit a str of width {width}",
            b.len()
        );
        let mut v = match width {
            0 => vec![0xa0 | b.len() as u8],
            8 => vec![0xd9, b.len() as u8],
            16 => [vec![0xda], (b.len() as u16).to_be_bytes().to_vec()].concat(),
            _ => [vec![0xdb], (b.len() as u32).to_be_bytes().to_vec()].concat(),
        };
        v.extend_from_slice(b);
        v
    }
    /// A `str 8` header followed by arbitrary (possibly invalid UTF-8)
    /// bytes.
    pub fn str_bytes(b: &[u8]) -> Vec<u8> {
        let n = u8::try_from(b.len()).expect("str_bytes takes at most 255 bytes");
        let mut v = vec![0xd9, n];
        v.extend_from_slice(b);
        v
    }
    /// A `bin` in its smallest form.
    pub fn bin(b: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        super::put_bin(b, &mut v);
        v
    }
    /// An array of already encoded items.
    pub fn arr(items: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        super::put_len(items.len(), [0x90, 0xdc, 0xdd], &mut v);
        for i in items {
            v.extend_from_slice(i);
        }
        v
    }
    /// A map with raw (already encoded) keys.
    pub fn raw_map(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut v = Vec::new();
        super::put_len(entries.len(), [0x80, 0xde, 0xdf], &mut v);
        for (k, val) in entries {
            v.extend_from_slice(k);
            v.extend_from_slice(val);
        }
        v
    }
    /// A map with `str` keys.
    pub fn map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let raw: Vec<_> = entries.iter().map(|(k, v)| (str(k), v.clone())).collect();
        raw_map(&raw)
    }
}

/// Decodes exactly one value filling the whole buffer.
pub fn decode(buf: &[u8]) -> Result<Value, String> {
    let mut r = Reader { buf, pos: 0 };
    let v = r.value(0)?;
    if r.pos != buf.len() {
        return Err(format!("{} bytes after the value", buf.len() - r.pos));
    }
    Ok(v)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.buf.len() - self.pos < n {
            return Err("truncated value".into());
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn be(&mut self, n: usize) -> Result<u64, String> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }
    fn str(&mut self, n: usize) -> Result<Value, String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(Value::Str)
            .map_err(|_| "string is not UTF-8".to_string())
    }
    fn items(&mut self, n: usize, depth: usize) -> Result<Vec<Value>, String> {
        (0..n).map(|_| self.value(depth + 1)).collect()
    }
    fn pairs(&mut self, n: usize, depth: usize) -> Result<Vec<(Value, Value)>, String> {
        (0..n)
            .map(|_| Ok((self.value(depth + 1)?, self.value(depth + 1)?)))
            .collect()
    }
    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > 64 {
            return Err("nested too deeply".into());
        }
        let b = self.u8()?;
        Ok(match b {
            0x00..=0x7f => Value::Int(i128::from(b)),
            0x80..=0x8f => Value::Map(self.pairs(usize::from(b & 0x0f), depth)?),
            0x90..=0x9f => Value::Array(self.items(usize::from(b & 0x0f), depth)?),
            0xa0..=0xbf => self.str(usize::from(b & 0x1f))?,
            0xc0 => Value::Nil,
            0xc1 => return Err("reserved byte 0xc1".into()),
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let n = self.be(1 << (b - 0xc4))? as usize;
                Value::Bin(self.take(n)?.to_vec())
            }
            0xc7..=0xc9 => {
                let n = self.be(1 << (b - 0xc7))? as usize;
                let t = self.u8()? as i8;
                Value::Ext(t, self.take(n)?.to_vec())
            }
            0xca => Value::Float(f64::from(f32::from_bits(self.be(4)? as u32))),
            0xcb => Value::Float(f64::from_bits(self.be(8)?)),
            0xcc..=0xcf => Value::Int(i128::from(self.be(1 << (b - 0xcc))?)),
            0xd0 => Value::Int(i128::from(self.be(1)? as u8 as i8)),
            0xd1 => Value::Int(i128::from(self.be(2)? as u16 as i16)),
            0xd2 => Value::Int(i128::from(self.be(4)? as u32 as i32)),
            0xd3 => Value::Int(i128::from(self.be(8)? as i64)),
            0xd4..=0xd8 => {
                let t = self.u8()? as i8;
                Value::Ext(t, self.take(1 << (b - 0xd4))?.to_vec())
            }
            0xd9..=0xdb => {
                let n = self.be(1 << (b - 0xd9))? as usize;
                self.str(n)?
            }
            0xdc | 0xdd => {
                let n = self.be(2 << (b - 0xdc))? as usize;
                Value::Array(self.items(n, depth)?)
            }
            0xde | 0xdf => {
                let n = self.be(2 << (b - 0xde))? as usize;
                Value::Map(self.pairs(n, depth)?)
            }
            0xe0..=0xff => Value::Int(i128::from(b as i8)),
        })
    }
}
