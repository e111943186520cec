//! HPACK (RFC 7541) decoding of the header blocks a plugin's gRPC server sends: the answer's
//! head and its trailers. Requests are encoded without the dynamic table (see `super`), so
//! only decoding keeps state.

use std::{borrow::Cow, collections::VecDeque, sync::OnceLock};

use super::huffman_table::{CODES, LENGTHS};

/// A header block that does not decode: the connection cannot go on (RFC 7540 §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub(crate) &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a header block does not decode: {}", self.0)
    }
}

/// A field the table holds: name and value.
type Stored = (Box<[u8]>, Box<[u8]>);
/// A field as decoded: borrowed from the block unless Huffman-coded or indexed.
type Decoded<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

/// The decoding side of one connection's header compression.
#[derive(Debug)]
pub(crate) struct Decoder {
    /// Newest first, as the dynamic table is indexed.
    table: VecDeque<Stored>,
    size: usize,
    max_size: usize,
    /// What our SETTINGS allow the peer to use (`SETTINGS_HEADER_TABLE_SIZE`).
    limit: usize,
}

impl Decoder {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// Decodes `block`, handing each field to `field` in order.
    pub(crate) fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let mut fields = 0;
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                let (name, value) = self.entry(index)?;
                field(name, value);
            } else if first & 0xc0 == 0x40 {
                let (name, value) = self.literal(&mut block, 6)?;
                field(&name, &value);
                self.insert(name.into_owned().into(), value.into_owned().into());
            } else if first & 0xe0 == 0x20 {
                // A size update may only open a block (RFC 7541 §4.2).
                if fields > 0 {
                    return Err(DecodeError("a table size update after a field"));
                }
                let size = integer(&mut block, 5)?;
                if size > self.limit {
                    return Err(DecodeError("a table size over the limit we set"));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                // Without indexing (0000) or never indexed (0001): not stored either way.
                let (name, value) = self.literal(&mut block, 4)?;
                field(&name, &value);
            }
            fields += 1;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        match index {
            0 => Err(DecodeError("index 0")),
            1..=61 => {
                let (name, value) = STATIC[index - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(name, value)| (&name[..], &value[..]))
                .ok_or(DecodeError("an index past the table")),
        }
    }

    fn literal<'a>(&self, block: &mut &'a [u8], prefix: u8) -> Result<Decoded<'a>, DecodeError> {
        let index = integer(block, prefix)?;
        let name = if index == 0 {
            string(block)?
        } else {
            Cow::Owned(self.entry(index)?.0.to_vec())
        };
        Ok((name, string(block)?))
    }

    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let size = name.len() + value.len() + 32;
        if size > self.max_size {
            // An entry larger than the table empties it and is not stored (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Drops the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((name, value)) = self.table.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + 32;
        }
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1).
fn integer(block: &mut &[u8], n: u8) -> Result<usize, DecodeError> {
    let (&first, mut rest) = block
        .split_first()
        .ok_or(DecodeError("a truncated integer"))?;
    let mask = (1u8 << n) - 1;
    let mut value = usize::from(first & mask);
    if value == usize::from(mask) {
        let mut shift = 0;
        loop {
            let (&byte, tail) = rest
                .split_first()
                .ok_or(DecodeError("a truncated integer"))?;
            rest = tail;
            // Nothing a plugin sends needs more than 28 bits.
            if shift > 21 {
                return Err(DecodeError("an integer too large"));
            }
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    *block = rest;
    Ok(value)
}

/// A string literal, Huffman-coded or not (RFC 7541 §5.2).
fn string<'a>(block: &mut &'a [u8]) -> Result<Cow<'a, [u8]>, DecodeError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let len = integer(block, 7)?;
    if block.len() < len {
        return Err(DecodeError("a truncated string"));
    }
    let (bytes, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        huffman_decode(bytes).map(Cow::Owned)
    } else {
        Ok(Cow::Borrowed(bytes))
    }
}

/// The canonical code, as decoding needs it: per code length, the first code and the symbols
/// in code order.
struct Canonical {
    first: [u32; 31],
    start: [usize; 31],
    count: [usize; 31],
    symbols: [u8; 256],
}

fn canonical() -> &'static Canonical {
    static CANONICAL: OnceLock<Canonical> = OnceLock::new();
    CANONICAL.get_or_init(|| {
        let mut order: Vec<u8> = (0..=255).collect();
        order.sort_by_key(|&s| (LENGTHS[usize::from(s)], CODES[usize::from(s)]));
        let mut table = Canonical {
            first: [0; 31],
            start: [0; 31],
            count: [0; 31],
            symbols: [0; 256],
        };
        for (at, &symbol) in order.iter().enumerate() {
            let len = usize::from(LENGTHS[usize::from(symbol)]);
            if table.count[len] == 0 {
                table.first[len] = CODES[usize::from(symbol)];
                table.start[len] = at;
            }
            table.count[len] += 1;
            table.symbols[at] = symbol;
        }
        table
    })
}

fn huffman_decode(bytes: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let table = canonical();
    let mut out = Vec::with_capacity(bytes.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in bytes {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len >= 30 {
                return Err(DecodeError("a Huffman code past the longest symbol"));
            }
            let count = table.count[len];
            if count > 0 && code >= table.first[len] {
                let offset = (code - table.first[len]) as usize;
                if offset < count {
                    out.push(table.symbols[table.start[len] + offset]);
                    (code, len) = (0, 0);
                }
            }
        }
    }
    // What is left must be the start of the end-of-string code: at most 7 one bits.
    if len > 7 || code != (1 << len) - 1 {
        return Err(DecodeError("bad Huffman padding"));
    }
    Ok(out)
}

/// RFC 7541, Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fields(decoder: &mut Decoder, block: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        decoder
            .decode(&hex(block), |n, v| {
                out.push((
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                ))
            })
            .unwrap();
        out
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// RFC 7541 C.3: requests without Huffman coding, one connection's table.
    #[test]
    fn decodes_the_rfc_requests_without_huffman() {
        let mut decoder = Decoder::new(4096);
        let first = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        assert_eq!(
            fields(&mut decoder, "828684410f7777772e6578616d706c652e636f6d"),
            pairs(&first)
        );
        assert_eq!(decoder.size, 57);
        let mut second = first.to_vec();
        second.push(("cache-control", "no-cache"));
        assert_eq!(
            fields(&mut decoder, "828684be58086e6f2d6361636865"),
            pairs(&second)
        );
        assert_eq!(decoder.size, 110);
    }

    /// RFC 7541 C.4: the same with Huffman-coded strings.
    #[test]
    fn decodes_the_rfc_requests_with_huffman() {
        let mut decoder = Decoder::new(4096);
        assert_eq!(
            fields(&mut decoder, "828684418cf1e3c2e5f23a6ba0ab90f4ff"),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(
            fields(&mut decoder, "828684be5886a8eb10649cbf"),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        assert_eq!(
            fields(
                &mut decoder,
                "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"
            ),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(decoder.size, 164);
    }

    #[test]
    fn evicts_the_oldest_entries_and_obeys_size_updates() {
        let mut decoder = Decoder::new(64);
        // "a: b" (34 bytes) then "c: d": only one fits in 64.
        fields(&mut decoder, "4001610162");
        fields(&mut decoder, "4001630164");
        assert_eq!(decoder.table.len(), 1);
        assert_eq!(fields(&mut decoder, "be"), pairs(&[("c", "d")]));
        // A size update to 0 empties the table; one above our limit is refused.
        fields(&mut decoder, "20");
        assert!(decoder.table.is_empty());
        assert!(decoder.decode(&hex("3f22"), |_, _| {}).is_err());
        // After a field it is refused too.
        assert!(decoder.decode(&hex("8820"), |_, _| {}).is_err());
    }

    #[test]
    fn refuses_what_does_not_decode() {
        let mut decoder = Decoder::new(4096);
        for block in ["80", "ff00", "bf", "0001", "000161", "00018f", "7f"] {
            assert!(
                decoder.decode(&hex(block), |_, _| {}).is_err(),
                "{block} decoded"
            );
        }
        // Huffman padding longer than 7 bits, or not all ones.
        assert!(huffman_decode(&[0xff]).is_err());
        assert!(huffman_decode(&[0x00]).is_err());
        assert_eq!(huffman_decode(&[0x07]).unwrap(), b"0");
        assert_eq!(huffman_decode(&[0x1f]).unwrap(), b"a");
        assert!(huffman_decode(&[0x07, 0xfe]).is_err());
    }
}
