//! A streaming tar reader and writer: what WebDataset shards are.
//!
//! The reader takes any [`Read`] and yields the regular files in archive order, each read whole:
//! POSIX ustar (with its `prefix` field), GNU long names (`L` entries), pax extended headers (`x`,
//! for `path` and `size`) and old v7 headers. Global pax headers (`g`) and directories are skipped;
//! links, devices and sparse files are errors (a shard holds plain files). Every header's checksum
//! is verified. Errors name the archive, the entry and the byte offset of its header: a truncated
//! archive, a bad checksum or input that is no tar at all is never mistaken for an archive that
//! simply ends.
//!
//! The writer writes ustar entries (mode 0644, owner 0, mtime 0, so that the same samples give the
//! same bytes), a pax `path` record before an entry whose name is longer than the 100 bytes of
//! the ustar name field (and a pax `size` record for a file of 8 GiB or more), pads every file to
//! 512 bytes, and ends the archive with two zero blocks.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::DataError;

/// Tar's block size: headers and padded file contents are whole blocks.
pub const BLOCK: usize = 512;

/// The most bytes a pax or GNU long-name header may hold: a name, not a file.
const MAX_META: u64 = 1 << 20;

/// One regular file of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// The path inside the archive (pax `path`, GNU long name, or ustar prefix + name).
    pub name: String,
    /// The file's contents.
    pub data: Vec<u8>,
    /// Byte offset of the entry's ustar header in the archive (of its first pax or long-name header
    /// when it has one).
    pub offset: u64,
}

/// Reads the regular files of a tar archive one at a time (see the module docs). `path` only
/// names the archive in errors. After an error the reader yields nothing more.
pub struct TarReader<R: Read> {
    inner: R,
    path: PathBuf,
    /// Bytes consumed so far: the offset of the next header.
    offset: u64,
    done: bool,
}

/// The fields of one header that the reader uses.
struct Header {
    name: String,
    size: u64,
    kind: u8,
}

impl<R: Read> TarReader<R> {
    /// A reader of the archive `inner`; `path` names it in errors.
    pub fn new(inner: R, path: impl Into<PathBuf>) -> Self {
        Self { inner, path: path.into(), offset: 0, done: false }
    }

    /// The archive's name, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn error(&self, message: impl Into<String>) -> DataError {
        DataError::shard(&self.path, message)
    }

    /// Reads up to `buf.len()` bytes; returns how many (fewer only at the end of the input).
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, DataError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(self.error(format!("cannot read at byte {}: {e}", self.offset + got as u64)));
                }
            }
        }
        self.offset += got as u64;
        Ok(got)
    }

    /// Reads an entry's contents (`size` bytes, then the padding to a whole block).
    fn read_data(&mut self, size: u64, name: &str, header_at: u64) -> Result<Vec<u8>, DataError> {
        let start = self.offset;
        let mut data = Vec::new();
        let mut limited = (&mut self.inner).take(size);
        let read = loop {
            match limited.read_to_end(&mut data) {
                Ok(_) => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.offset += data.len() as u64;
        if let Err(e) = read {
            return Err(self.error(format!(
                "entry `{name}` (header at byte {header_at}): cannot read at byte {}: {e}",
                self.offset
            )));
        }
        if (data.len() as u64) < size {
            return Err(self.error(format!(
                "truncated: entry `{name}` (header at byte {header_at}) declares {size} bytes from byte {start}, \
                 the archive ends at byte {}",
                self.offset
            )));
        }
        let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        let mut padding = [0u8; BLOCK];
        if self.fill(&mut padding[..pad])? < pad {
            return Err(self.error(format!(
                "truncated: the padding of entry `{name}` (header at byte {header_at}) ends early at byte {}",
                self.offset
            )));
        }
        Ok(data)
    }

    /// Reads and checks the header at the current offset; `None` at the end-of-archive marker.
    fn header(&mut self) -> Result<Option<Header>, DataError> {
        let at = self.offset;
        let mut block = [0u8; BLOCK];
        let got = self.fill(&mut block)?;
        if got == 0 && at == 0 {
            return Err(self.error("empty file: not a tar archive"));
        }
        if got == 0 {
            return Err(self.error(format!(
                "truncated: the archive ends at byte {at} without its end-of-archive blocks (an entry or \
                 more may be missing)"
            )));
        }
        if got < BLOCK && at == 0 {
            return Err(self.error(format!("not a tar archive ({got} bytes, less than one tar header)")));
        }
        if got < BLOCK {
            return Err(self.error(format!("truncated: the header at byte {at} has {got} of {BLOCK} bytes")));
        }
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let recorded = octal(&block[148..156]);
        let unsigned: u64 =
            block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u64 }).sum();
        let signed: i64 =
            block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as i8 as i64 }).sum();
        let sound = recorded.is_some_and(|r| r == unsigned || r as i64 == signed);
        if !sound {
            if at == 0 {
                return Err(self.error("not a tar archive (no valid tar header at byte 0)"));
            }
            let name = text_field(&block[..100]);
            return Err(self.error(match recorded {
                Some(r) => format!(
                    "bad header checksum at byte {at} (entry `{name}`?): recorded {r}, computed {unsigned}; the \
                     archive is damaged"
                ),
                None => format!("no valid tar header at byte {at}: the archive is damaged or not a tar archive"),
            }));
        }
        let size = number(&block[124..136])
            .ok_or_else(|| self.error(format!("the header at byte {at} has an unreadable size field")))?;
        let ustar = &block[257..263] == b"ustar\0";
        let mut name = text_field(&block[..100]);
        let prefix = text_field(&block[345..500]);
        if ustar && !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
        Ok(Some(Header { name, size, kind: block[156] }))
    }

    /// The next regular file, following long-name and pax headers.
    fn next_entry(&mut self) -> Result<Option<TarEntry>, DataError> {
        // A name from a GNU long-name or pax header, the offset of the first such header, and a
        // size from a pax header: all for the next file entry.
        let mut long_name: Option<String> = None;
        let mut meta_at: Option<u64> = None;
        let mut pax_size: Option<u64> = None;
        loop {
            let at = self.offset;
            let Some(mut header) = self.header()? else {
                if let Some(first) = meta_at {
                    return Err(self.error(format!(
                        "the extended header at byte {first} is followed by the end of the archive, not by its entry"
                    )));
                }
                return Ok(None);
            };
            if matches!(header.kind, b'L' | b'x' | b'g' | b'K') {
                if header.size > MAX_META {
                    return Err(self.error(format!(
                        "the extended header at byte {at} declares {} bytes; at most {MAX_META} are accepted",
                        header.size
                    )));
                }
                let data = self.read_data(header.size, &header.name, at)?;
                match header.kind {
                    b'L' => {
                        let name = String::from_utf8(trim_nul(&data).to_vec())
                            .map_err(|_| self.error(format!("the GNU long name at byte {at} is not UTF-8")))?;
                        long_name = Some(name);
                    }
                    b'x' => {
                        let records =
                            pax_records(&data).map_err(|m| self.error(format!("the pax header at byte {at}: {m}")))?;
                        for (key, value) in records {
                            match key.as_str() {
                                "path" => long_name = Some(value),
                                "size" => {
                                    let size = value.parse().map_err(|_| {
                                        self.error(format!(
                                            "the pax header at byte {at}: size `{value}` is not a number"
                                        ))
                                    })?;
                                    pax_size = Some(size);
                                }
                                _ => {}
                            }
                        }
                    }
                    // Global pax headers and GNU long link names say nothing a shard reader uses.
                    _ => continue,
                }
                meta_at.get_or_insert(at);
                continue;
            }
            let first = meta_at.take().unwrap_or(at);
            if let Some(name) = long_name.take() {
                header.name = name;
            }
            if let Some(size) = pax_size.take() {
                header.size = size;
            }
            match header.kind {
                b'0' | 0 | b'7' => {
                    let data = self.read_data(header.size, &header.name, first)?;
                    return Ok(Some(TarEntry { name: header.name, data, offset: first }));
                }
                b'5' => {
                    // A directory: GNU tar records no contents, but skip any it declares.
                    self.read_data(header.size, &header.name, first)?;
                }
                b'1' | b'2' => {
                    return Err(self.error(format!(
                        "entry `{}` at byte {first} is a link; a shard must hold regular files only (write it \
                         with links dereferenced)",
                        header.name
                    )));
                }
                other => {
                    return Err(self.error(format!(
                        "entry `{}` at byte {first} is of tar type `{}`, not a regular file or folder",
                        header.name,
                        (other as char).escape_default()
                    )));
                }
            }
        }
    }
}

impl<R: Read> Iterator for TarReader<R> {
    type Item = Result<TarEntry, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_entry();
        if !matches!(next, Ok(Some(_))) {
            self.done = true;
        }
        next.transpose()
    }
}

fn trim_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// A NUL-terminated header text field; bytes that are not UTF-8 are replaced (names in pax or
/// long-name records take precedence anyway).
fn text_field(bytes: &[u8]) -> String {
    String::from_utf8_lossy(trim_nul(bytes)).into_owned()
}

/// An octal header field (space- or NUL-terminated, possibly space-padded in front); `None` if it
/// holds anything else.
fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(trim_nul(field)).ok()?.trim_matches(' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// A numeric field: octal, or GNU's base-256 (high bit of the first byte set) for large values.
fn number(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(&b) if b & 0x80 != 0 => {
            if b & 0x40 != 0 {
                return None; // negative
            }
            let mut v: u64 = (b & 0x3f) as u64;
            for &byte in &field[1..] {
                v = v.checked_mul(256)?.checked_add(byte as u64)?;
            }
            Some(v)
        }
        _ => octal(field),
    }
}

/// Parses pax records `"<length> <key>=<value>\n"`, where length counts the whole record.
fn pax_records(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let space = rest.iter().position(|&b| b == b' ').ok_or("a record without its length")?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("a record whose length is not a number")?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(format!("a record of length {len} does not fit the {} bytes left", rest.len()));
        }
        let record = std::str::from_utf8(&rest[space + 1..len - 1]).map_err(|_| "a record that is not UTF-8")?;
        let (key, value) = record.split_once('=').ok_or("a record without `=`")?;
        out.push((key.to_string(), value.to_string()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Writes a tar archive entry by entry (see the module docs). [`TarWriter::finish`] writes the
/// end-of-archive blocks; an archive dropped before it lacks them, which readers report as
/// truncated.
pub struct TarWriter<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> TarWriter<W> {
    /// A writer of a new archive into `inner` (wrap a file in a `BufWriter`: entries are written
    /// in blocks of 512 bytes).
    pub fn new(inner: W) -> Self {
        Self { inner, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends the regular file `name` holding `data`. `name` must be a relative path without
    /// NUL bytes.
    pub fn append(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        if name.is_empty() || name.contains('\0') {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad tar entry name {name:?}")));
        }
        let size = data.len() as u64;
        let mut pax = Vec::new();
        if name.len() > 100 {
            pax.push(("path", name.to_string()));
        }
        if size >= 1 << 33 {
            pax.push(("size", size.to_string()));
        }
        if !pax.is_empty() {
            let records = pax_bytes(&pax);
            let header = ustar_header(&pax_header_name(name), records.len() as u64, b'x');
            self.write_block(&header)?;
            self.write_padded(&records)?;
        }
        self.write_block(&ustar_header(name, size, b'0'))?;
        self.write_padded(data)
    }

    /// Entry bytes `append` writes for a file `name` of `size` bytes (headers and padding
    /// included): what a shard writer adds to an archive's size before deciding to start a new one.
    pub fn entry_size(name: &str, size: u64) -> u64 {
        let padded = |n: u64| n.div_ceil(BLOCK as u64) * BLOCK as u64;
        let mut pax = Vec::new();
        if name.len() > 100 {
            pax.push(("path", name.to_string()));
        }
        if size >= 1 << 33 {
            pax.push(("size", size.to_string()));
        }
        let pax_len = if pax.is_empty() { 0 } else { BLOCK as u64 + padded(pax_bytes(&pax).len() as u64) };
        pax_len + BLOCK as u64 + padded(size)
    }

    /// Writes the two zero blocks that end an archive and returns the inner writer, flushed.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.write_block(&[0u8; BLOCK])?;
        self.write_block(&[0u8; BLOCK])?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn write_block(&mut self, block: &[u8; BLOCK]) -> std::io::Result<()> {
        self.inner.write_all(block)?;
        self.written += BLOCK as u64;
        Ok(())
    }

    fn write_padded(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(data)?;
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.inner.write_all(&[0u8; BLOCK][..pad])?;
        self.written += (data.len() + pad) as u64;
        Ok(())
    }
}

/// Pax records, each `"<length> <key>=<value>\n"` with the length counting itself.
fn pax_bytes(records: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body = format!(" {key}={value}\n");
        // The length's own digits count: grow it until it is consistent.
        let mut len = body.len() + 1;
        while len != body.len() + len.to_string().len() {
            len = body.len() + len.to_string().len();
        }
        out.extend_from_slice(format!("{len}{body}").as_bytes());
    }
    out
}

/// The name of a pax header entry (what tools that ignore pax would extract it as).
fn pax_header_name(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let mut cut = base.len().min(80);
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("PaxHeaders/{}", &base[..cut])
}

/// A ustar header block for a file or pax record of `size` bytes; a name over 100 bytes is cut
/// (a pax `path` record before it carries the whole name).
fn ustar_header(name: &str, size: u64, kind: u8) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let mut cut = name.len().min(100);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    h[..cut].copy_from_slice(&name.as_bytes()[..cut]);
    put_octal(&mut h[100..108], 0o644);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    // Sizes of 8 GiB and more do not fit 11 octal digits: the pax `size` record carries them.
    put_octal(&mut h[124..136], if size < 1 << 33 { size } else { 0 });
    put_octal(&mut h[136..148], 0);
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    put_octal(&mut h[148..155], sum);
    h[155] = b' ';
    h
}

/// Zero-padded octal digits filling all but the last byte of `field`, then a NUL.
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_lengths_count_themselves() {
        for n in [1, 80, 93, 94, 95, 990, 995, 1000] {
            let bytes = pax_bytes(&[("path", "x".repeat(n))]);
            let records = pax_records(&bytes).unwrap();
            assert_eq!(records, [("path".to_string(), "x".repeat(n))]);
        }
    }

    #[test]
    fn entry_size_matches_what_is_written() {
        for (name, size) in [("a.txt", 0usize), ("b.jpg", 1), ("c.png", 512), (&"d".repeat(150) as &str, 700)] {
            let mut w = TarWriter::new(Vec::new());
            w.append(name, &vec![7u8; size]).unwrap();
            assert_eq!(w.written(), TarWriter::<Vec<u8>>::entry_size(name, size as u64), "{name}");
        }
    }

    #[test]
    fn base256_sizes_are_read() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[11] = 5;
        field[10] = 1;
        assert_eq!(number(&field), Some(261));
        assert_eq!(octal(b"0000644 \0"), Some(0o644));
        assert_eq!(octal(b"  12\0"), Some(0o12));
        assert_eq!(octal(b"9\0"), None);
    }
}
