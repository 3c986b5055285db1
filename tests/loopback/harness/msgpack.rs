//! A small MessagePack reader and writer, independent of the crate's serde
//! types, so the tests check the agent's maps the way a host written in
//! another language would: key by key, type by type.

#![allow(dead_code)]

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
            Value::Int(i) => encode_int(*i, out),
            Value::Float(x) => {
                out.push(0xcb);
                out.extend_from_slice(&x.to_be_bytes());
            }
            Value::Str(s) => {
                let n = s.len();
                if n < 32 {
                    out.push(0xa0 | n as u8);
                } else if n < 256 {
                    out.push(0xd9);
                    out.push(n as u8);
                } else if n < 65536 {
                    out.push(0xda);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                } else {
                    out.push(0xdb);
                    out.extend_from_slice(&(n as u32).to_be_bytes());
                }
                out.extend_from_slice(s.as_bytes());
            }
            Value::Bin(b) => {
                let n = b.len();
                if n < 256 {
                    out.push(0xc4);
                    out.push(n as u8);
                } else if n < 65536 {
                    out.push(0xc5);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                } else {
                    out.push(0xc6);
                    out.extend_from_slice(&(n as u32).to_be_bytes());
                }
                out.extend_from_slice(b);
            }
            Value::Array(a) => {
                let n = a.len();
                if n < 16 {
                    out.push(0x90 | n as u8);
                } else if n < 65536 {
                    out.push(0xdc);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                } else {
                    out.push(0xdd);
                    out.extend_from_slice(&(n as u32).to_be_bytes());
                }
                for v in a {
                    v.encode_into(out);
                }
            }
            Value::Map(m) => {
                let n = m.len();
                if n < 16 {
                    out.push(0x80 | n as u8);
                } else if n < 65536 {
                    out.push(0xde);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                } else {
                    out.push(0xdf);
                    out.extend_from_slice(&(n as u32).to_be_bytes());
                }
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

fn encode_int(i: i128, out: &mut Vec<u8>) {
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

/// Integer encodings of a fixed width, for "any integer width" tests.
pub fn uint64(v: u64) -> Vec<u8> {
    let mut out = vec![0xcf];
    out.extend_from_slice(&v.to_be_bytes());
    out
}

pub fn int64(v: i64) -> Vec<u8> {
    let mut out = vec![0xd3];
    out.extend_from_slice(&v.to_be_bytes());
    out
}

pub fn uint32(v: u32) -> Vec<u8> {
    let mut out = vec![0xce];
    out.extend_from_slice(&v.to_be_bytes());
    out
}

pub fn int16(v: i16) -> Vec<u8> {
    let mut out = vec![0xd1];
    out.extend_from_slice(&v.to_be_bytes());
    out
}

/// Appends a fixstr.
pub fn fixstr(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 32);
    out.push(0xa0 | s.len() as u8);
    out.extend_from_slice(s.as_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v = Value::map([
            ("a", Value::int(-1)),
            ("b", Value::int(300)),
            ("c", Value::int(-40000)),
            ("d", Value::int(u64::MAX)),
            ("e", Value::str(&"x".repeat(40))),
            ("f", Value::Array(vec![Value::Nil, Value::Bool(true)])),
            ("g", Value::Bin(vec![1, 2, 3])),
        ]);
        assert_eq!(decode(&v.encode()).unwrap(), v);
    }
}
