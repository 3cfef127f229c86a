//! A JPEG decoder whose pixels equal libjpeg-turbo's, the decoder behind Pillow (and so behind the
//! BLIP/ContextBLIP and CLIP reference code), with the settings Pillow uses: the accurate integer
//! IDCT (`JDCT_ISLOW`, `jidctint.c`), fancy (triangular) chroma upsampling (`jdsample.c`), and
//! libjpeg's fixed-point YCbCr → RGB tables (`jdcolor.c`). Every step is integer arithmetic, so the
//! result is bit-exact, not close: libjpeg-turbo's SIMD kernels are themselves exact to its C code.
//!
//! Covered: baseline and extended sequential (SOF0/SOF1) and progressive (SOF2) Huffman JPEGs, 8-bit
//! samples, any sampling factors (4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1 …), restart intervals, and the
//! colour spaces libjpeg infers: grey, YCbCr, RGB (Adobe transform 0 or component ids `R`,`G`,`B`),
//! CMYK and YCCK (Adobe transform 2). Not covered, reported as [`JpegError::Unsupported`] so that the
//! caller can fall back to another decoder: arithmetic coding, lossless and hierarchical JPEG, 12-bit
//! samples. Files that are damaged are decoded as libjpeg decodes them where it only warns, and its
//! warnings are returned with the pixels ([`JpegPixels::warnings`]): a bad Huffman code reads as 0
//! (17 bits spent); data that ends at a marker before its blocks leaves the rest of the restart
//! interval blank; restart markers out of sequence are resynchronised by libjpeg's policy; bytes
//! between segments are skipped. Marker segments are read in any order libjpeg accepts: tables
//! and restart intervals anywhere before a scan and between scans, a component's quantisation
//! table latched when its first scan starts, APPn segments anywhere, short JFIF and Adobe segments
//! ignored. The caller refuses truncated files before they get here.

/// What the decoder produced: interleaved 8-bit samples in the colour space libjpeg outputs for
/// Pillow (grey; RGB; CMYK as stored, i.e. Adobe-inverted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JpegPixels {
    pub width: u32,
    pub height: u32,
    pub layout: JpegLayout,
    pub samples: Vec<u8>,
    /// What libjpeg would have warned about (a damaged file it decodes all the same).
    pub warnings: Vec<JpegWarning>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegLayout {
    Gray,
    Rgb,
    /// CMYK as libjpeg outputs it (YCCK already converted); Adobe files store it inverted.
    Cmyk,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JpegError {
    /// A valid JPEG of a kind this decoder does not implement.
    #[error("unsupported JPEG: {0}")]
    Unsupported(String),
    #[error("corrupt JPEG: {0}")]
    Corrupt(String),
}

type Result<T> = std::result::Result<T, JpegError>;

fn corrupt<T>(message: impl Into<String>) -> Result<T> {
    Err(JpegError::Corrupt(message.into()))
}

/// `ZIGZAG[k]` is the natural (row-major) index of the k-th coefficient in zig-zag order; entries
/// past 63 absorb the overrun of a damaged run, as libjpeg's `jpeg_natural_order` does.
const ZIGZAG: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
];

/// Decodes a JPEG file's bytes.
pub fn decode_jpeg(bytes: &[u8]) -> Result<JpegPixels> {
    let mut decoder = Decoder::default();
    decoder.read(bytes)?;
    decoder.output()
}

/// The position of the next marker's code at or after `pos` (past its `FF`s), and how many bytes
/// before it were not a marker (libjpeg's `next_marker`: anything, `FF 00` pairs included).
fn find_marker(data: &[u8], mut pos: usize) -> (usize, usize) {
    let mut skipped = 0;
    loop {
        while pos < data.len() && data[pos] != 0xFF {
            pos += 1;
            skipped += 1;
        }
        while pos < data.len() && data[pos] == 0xFF {
            pos += 1;
        }
        if data.get(pos) != Some(&0x00) {
            return (pos, skipped);
        }
        pos += 1;
        skipped += 2;
    }
}

/// `(width, height)` from the frame header, without decoding: markers are walked as the decoder
/// walks them (so a file the decoder reads is never refused here for a segment it ignores, such
/// as an Adobe APP14 shorter than Adobe's 12 bytes, which libjpeg skips too).
pub fn jpeg_dimensions(data: &[u8]) -> Result<(u32, u32)> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
        return corrupt("no start-of-image marker");
    }
    let mut pos = 2;
    loop {
        pos = find_marker(data, pos).0;
        let Some(&marker) = data.get(pos) else { return corrupt("no frame header") };
        pos += 1;
        match marker {
            0xD0..=0xD7 | 0x01 => continue,
            0xD8 | 0xD9 | 0xDA => return corrupt("no frame header before the image data"),
            _ => {}
        }
        let len = be16(data, pos)?;
        if len < 2 || pos + len > data.len() {
            return corrupt(format!("marker FF{marker:02X} segment of {len} bytes overruns the file"));
        }
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let s = &data[pos + 2..pos + len];
            if s.len() < 6 {
                return corrupt("short frame header");
            }
            return Ok((be16(s, 3)? as u32, be16(s, 1)? as u32));
        }
        pos += len;
    }
}

// ---------------------------------------------------------------------------------------------
// Huffman tables

/// A Huffman table: a 9-bit lookahead for short codes, canonical limits for the rest.
#[derive(Clone)]
struct Huffman {
    /// `(code length, symbol)` for every 9-bit prefix that starts with a code of ≤ 9 bits; length 0
    /// when the code is longer.
    fast: Vec<(u8, u8)>,
    /// For length l (1..=16): the largest code of that length + 1 (0 when none), the first code,
    /// and the index of its first symbol.
    max_code: [i32; 18],
    first_code: [i32; 17],
    first_index: [usize; 17],
    symbols: Vec<u8>,
    /// For AC tables: for each 9-bit prefix holding a whole AC code *and* its magnitude bits, the
    /// coefficient at once: `value << 16 | run << 8 | bits used`; 0 where that does not fit.
    fast_ac: Vec<i32>,
}

const FAST_BITS: u32 = 9;

impl Huffman {
    fn new(counts: &[u8; 16], symbols: Vec<u8>) -> Result<Self> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total != symbols.len() || total > 256 {
            return corrupt("bad Huffman table");
        }
        let mut fast = vec![(0u8, 0u8); 1 << FAST_BITS];
        let (mut max_code, mut first_code, mut first_index) = ([-1i32; 18], [0i32; 17], [0usize; 17]);
        let (mut code, mut index) = (0i32, 0usize);
        for len in 1..=16usize {
            let n = counts[len - 1] as usize;
            // libjpeg's rule (`jpeg_make_d_derived_tbl`): the codes of each length must fit in
            // that many bits without the all-ones code.
            if code + n as i32 >= 1 << len {
                return corrupt("bad Huffman table (over-subscribed)");
            }
            first_code[len] = code;
            first_index[len] = index;
            for _ in 0..n {
                if len as u32 <= FAST_BITS {
                    let shift = FAST_BITS - len as u32;
                    let start = (code as usize) << shift;
                    for e in &mut fast[start..start + (1 << shift)] {
                        *e = (len as u8, symbols[index]);
                    }
                }
                code += 1;
                index += 1;
            }
            if n > 0 {
                max_code[len] = code; // one past the largest code of this length
            }
            code <<= 1;
        }
        max_code[17] = i32::MAX;
        let fast_ac = (0..1usize << FAST_BITS)
            .map(|prefix| {
                let (len, rs) = fast[prefix];
                let (run, size) = ((rs >> 4) as i32, (rs & 15) as u32);
                let used = len as u32 + size;
                if len == 0 || size == 0 || used > FAST_BITS {
                    return 0;
                }
                let bits = ((prefix >> (FAST_BITS - used)) & ((1 << size) - 1)) as i32;
                let value = if bits < (1 << (size - 1)) { bits - (1 << size) + 1 } else { bits };
                (value << 16) | (run << 8) | used as i32
            })
            .collect();
        Ok(Self { fast, max_code, first_code, first_index, symbols, fast_ac })
    }
}

// ---------------------------------------------------------------------------------------------
// Entropy-coded data

/// Reads the entropy-coded segment bit by bit: `FF 00` is a data byte `FF`; any other marker ends
/// the data, after which zeros are read. As libjpeg (`jpeg_fill_bit_buffer`): the first read past
/// the data warns ("premature end of data segment") and marks the data insufficient, and the
/// decoder then leaves the following MCUs as they are until a restart marker resets it.
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    bits: u64,
    count: u32,
    /// How many of the buffered bits (the first ones) came from the data; the rest are zeros put
    /// after the marker that ended it.
    real: u32,
    /// The data ran out within this restart interval (libjpeg's `insufficient_data`).
    insufficient: bool,
    /// The marker that stopped the data, if one was reached.
    marker: Option<u8>,
    warnings: Vec<JpegWarning>,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self { data, pos, bits: 0, count: 0, real: 0, insufficient: false, marker: None, warnings: vec![] }
    }

    /// Drops `n` consumed bits; reading past the data's own bits is libjpeg's `JWRN_HIT_MARKER`.
    #[inline]
    fn consume(&mut self, n: u32) {
        self.bits <<= n;
        self.count -= n;
        if n > self.real {
            self.real = 0;
            if !self.insufficient {
                self.insufficient = true;
                self.warnings.push(JpegWarning::PrematureEnd);
            }
        } else {
            self.real -= n;
        }
    }

    /// The next byte of entropy-coded data, or `None` at a marker (left unread) or the end.
    #[inline]
    fn next_data_byte(&mut self) -> Option<u8> {
        loop {
            if self.marker.is_some() || self.pos >= self.data.len() {
                return None;
            }
            let b = self.data[self.pos];
            if b != 0xFF {
                self.pos += 1;
                return Some(b);
            }
            match self.data.get(self.pos + 1).copied() {
                Some(0x00) => {
                    self.pos += 2;
                    return Some(0xFF);
                }
                // Fill bytes before a marker.
                Some(0xFF) => self.pos += 1,
                Some(m) => {
                    self.marker = Some(m);
                    return None;
                }
                None => {
                    self.marker = Some(0xD9);
                    return None;
                }
            }
        }
    }

    #[inline]
    fn fill(&mut self) {
        while self.count <= 56 {
            if let Some(byte) = self.next_data_byte() {
                self.bits |= (byte as u64) << (56 - self.count);
                // Zeros are only ever put after the last data byte, so the buffer holds data
                // bits up to here.
                self.real = self.count + 8;
            }
            self.count += 8;
        }
    }

    #[inline]
    fn bits(&mut self, n: u32) -> i32 {
        if n == 0 {
            return 0;
        }
        if self.count < n {
            self.fill();
        }
        let v = (self.bits >> (64 - n)) as i32;
        self.consume(n);
        v
    }

    /// The next AC coefficient of a sequential block when [`Huffman::fast_ac`] has it: `(run,
    /// value)`, its bits consumed.
    #[inline]
    fn fast_ac(&mut self, table: &Huffman) -> Option<(usize, i32)> {
        if self.count < 16 {
            self.fill();
        }
        let packed = table.fast_ac[(self.bits >> (64 - FAST_BITS)) as usize];
        if packed == 0 {
            return None;
        }
        let used = (packed & 0xFF) as u32;
        self.consume(used);
        Some((((packed >> 8) & 0xFF) as usize, packed >> 16))
    }

    #[inline]
    fn bit(&mut self) -> bool {
        self.bits(1) != 0
    }

    /// A Huffman-coded symbol; a code that matches nothing reads as 0 (libjpeg's
    /// `JWRN_HUFF_BAD_CODE`).
    #[inline]
    fn decode(&mut self, table: &Huffman) -> u8 {
        if self.count < 17 {
            self.fill();
        }
        let (len, symbol) = table.fast[(self.bits >> (64 - FAST_BITS)) as usize];
        if len > 0 {
            self.consume(len as u32);
            return symbol;
        }
        let mut len = FAST_BITS as usize + 1;
        loop {
            let code = (self.bits >> (64 - len)) as i32;
            if len > 16 {
                // libjpeg reads one bit past the longest length before it gives up (`l = 17`,
                // its sentinel `maxcode[17]`): 17 bits are spent on a bad code, read as 0.
                self.consume(17);
                self.warnings.push(JpegWarning::BadHuffmanCode);
                return 0;
            }
            if code < table.max_code[len] {
                self.consume(len as u32);
                let index = table.first_index[len] + (code - table.first_code[len]) as usize;
                return table.symbols.get(index).copied().unwrap_or(0);
            }
            len += 1;
        }
    }

    /// `n` bits read as a signed magnitude (JPEG's EXTEND).
    #[inline]
    fn receive_extend(&mut self, n: u8) -> i32 {
        if n == 0 {
            return 0;
        }
        let n = n.min(16) as u32;
        let v = self.bits(n);
        if v < (1 << (n - 1)) {
            v - (1 << n) + 1
        } else {
            v
        }
    }

    /// Skips to the next marker as libjpeg's `next_marker` does (bytes of data left unread count as
    /// extraneous, with a warning); `None` at the end of the file.
    fn seek_marker(&mut self) -> Option<u8> {
        if self.marker.is_none() {
            let mut skipped = (self.real / 8) as usize;
            loop {
                match self.data.get(self.pos) {
                    None => break,
                    Some(0xFF) => match self.data.get(self.pos + 1) {
                        Some(0xFF) => self.pos += 1,
                        Some(0x00) => {
                            skipped += 2;
                            self.pos += 2;
                        }
                        Some(&m) => {
                            self.marker = Some(m);
                            break;
                        }
                        None => break,
                    },
                    Some(_) => {
                        skipped += 1;
                        self.pos += 1;
                    }
                }
            }
            if skipped > 0 {
                self.warnings
                    .push(JpegWarning::ExtraneousBytes { count: skipped, marker: self.marker.unwrap_or(0xD9) });
            }
        }
        self.bits = 0;
        self.count = 0;
        self.real = 0;
        self.marker
    }

    /// At the end of a restart interval: libjpeg's `read_restart_marker` with its resync policy
    /// (`jpeg_resync_to_restart`) when the marker found is not RST`expected`: one of the next two
    /// restarts, or a marker that is not a restart, is left in place (the next interval reads as
    /// empty); one of the two before is skipped to look further; any other restart is taken. The
    /// data counts as sufficient again unless a marker was left in place.
    fn restart(&mut self, expected: u8) {
        let rst = |n: u8| 0xD0 + (n & 7);
        let mut first = true;
        loop {
            // The end of the file reads as an end-of-image marker (libjpeg's source managers insert one).
            let m = self.seek_marker().unwrap_or(0xD9);
            if m == rst(expected) {
                self.take_marker();
                break;
            }
            if first {
                self.warnings.push(JpegWarning::MissingRestart { found: m, expected });
                first = false;
            }
            let action = if m < 0xC0 {
                2
            } else if !(0xD0..=0xD7).contains(&m) {
                3
            } else if m == rst(expected.wrapping_add(1)) || m == rst(expected.wrapping_add(2)) {
                3
            } else if m == rst(expected.wrapping_sub(1)) || m == rst(expected.wrapping_sub(2)) {
                2
            } else {
                1
            };
            match action {
                1 => {
                    self.take_marker();
                    break;
                }
                2 => {
                    if self.marker.is_none() {
                        break; // the end of the file
                    }
                    self.take_marker();
                }
                _ => return,
            }
        }
        self.insufficient = false;
    }

    /// Steps over the marker the data stopped at.
    fn take_marker(&mut self) {
        if self.marker.take().is_some() {
            self.pos += 2;
        }
    }

    /// Where the data ended: the position of the marker that stopped it.
    fn end(&mut self) -> usize {
        self.seek_marker();
        self.pos
    }
}

/// What libjpeg warns about while it decodes a damaged file (it decodes it all the same, and so
/// does [`decode_jpeg`], to the same pixels): its messages, as `djpeg` and Pillow's libjpeg print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JpegWarning {
    /// `JWRN_HIT_MARKER`: the entropy-coded data ended (at a marker) before the blocks it codes;
    /// the rest of the restart interval is left blank.
    PrematureEnd,
    /// `JWRN_HUFF_BAD_CODE`: a bit pattern that is no code of the table (read as 0).
    BadHuffmanCode,
    /// `JWRN_EXTRANEOUS_DATA`: bytes that are neither data nor marker, skipped.
    ExtraneousBytes { count: usize, marker: u8 },
    /// `JWRN_MUST_RESYNC`: a restart marker out of sequence, or missing.
    MissingRestart { found: u8, expected: u8 },
}

impl std::fmt::Display for JpegWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PrematureEnd => write!(f, "Corrupt JPEG data: premature end of data segment"),
            Self::BadHuffmanCode => write!(f, "Corrupt JPEG data: bad Huffman code"),
            Self::ExtraneousBytes { count, marker } => {
                write!(f, "Corrupt JPEG data: {count} extraneous bytes before marker 0x{marker:02x}")
            }
            Self::MissingRestart { found, expected } => {
                write!(f, "Corrupt JPEG data: found marker 0x{found:02x} instead of RST{expected}")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame and scans

#[derive(Clone, Default)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant: usize,
    /// Blocks stored per row and rows of blocks (MCU-padded).
    stride_blocks: usize,
    rows_blocks: usize,
    /// Blocks that hold image data (libjpeg's `width_in_blocks`, `height_in_blocks`).
    width_blocks: usize,
    height_blocks: usize,
    /// Samples of the component (libjpeg's `downsampled_width`, `downsampled_height`).
    width: usize,
    height: usize,
    /// Coefficients in natural order, 64 per block, blocks row by row.
    coefs: Vec<i16>,
    dc_pred: i32,
    /// Its quantisation table, as it was when its first scan started.
    qtable: Option<[u16; 64]>,
}

#[derive(Default)]
struct Decoder {
    quant: [Option<[u16; 64]>; 4],
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<Huffman>; 4],
    components: Vec<Component>,
    width: usize,
    height: usize,
    progressive: bool,
    max_h: usize,
    max_v: usize,
    mcus_x: usize,
    mcus_y: usize,
    restart_interval: usize,
    jfif: bool,
    adobe_transform: Option<u8>,
    eob_run: u32,
    frame_seen: bool,
    scans: usize,
    warnings: Vec<JpegWarning>,
}

fn be16(data: &[u8], at: usize) -> Result<usize> {
    match data.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]]) as usize),
        None => corrupt("unexpected end of data in a marker segment"),
    }
}

impl Decoder {
    fn read(&mut self, data: &[u8]) -> Result<()> {
        if data.len() < 4 || data[0] != 0xFF || data[1] != 0xD8 {
            return corrupt("no start-of-image marker");
        }
        let mut pos = 2;
        loop {
            // Find the next marker as libjpeg's `next_marker` does: bytes before it, `FF 00` pairs
            // included, are skipped with a warning; repeated `FF`s are fill.
            let skipped;
            (pos, skipped) = find_marker(data, pos);
            if skipped > 0 {
                let marker = data.get(pos).copied().unwrap_or(0xD9);
                self.warnings.push(JpegWarning::ExtraneousBytes { count: skipped, marker });
            }
            let Some(&marker) = data.get(pos) else {
                return if self.scans > 0 { Ok(()) } else { corrupt("no image data (no scan before the end)") };
            };
            pos += 1;
            match marker {
                0xD8 => return corrupt("a second start-of-image marker"),
                0xD9 => {
                    return if self.scans > 0 {
                        Ok(())
                    } else {
                        corrupt("no image data (end of image before any scan)")
                    }
                }
                0xD0..=0xD7 | 0x01 => continue, // stray RSTn / TEM: no segment
                _ => {}
            }
            let len = be16(data, pos)?;
            if len < 2 || pos + len > data.len() {
                return corrupt(format!("marker FF{marker:02X} segment of {len} bytes overruns the file"));
            }
            let segment = &data[pos + 2..pos + len];
            match marker {
                0xC0..=0xC2 => self.frame(segment, marker == 0xC2)?,
                0xC3 | 0xC5..=0xC7 => return Err(JpegError::Unsupported("lossless or hierarchical JPEG".into())),
                0xC9..=0xCB | 0xCD..=0xCF => return Err(JpegError::Unsupported("arithmetic coding".into())),
                0xC4 => self.huffman_tables(segment)?,
                0xDB => self.quant_tables(segment)?,
                0xDD => self.restart_interval = be16(segment, 0)?,
                // libjpeg counts a JFIF marker only with its full 14 bytes (`examine_app0`).
                0xE0 => self.jfif |= segment.len() >= 14 && segment.starts_with(b"JFIF\0"),
                // `examine_app14`: the transform byte of a 12-byte Adobe segment.
                0xEE if segment.len() >= 12 && segment.starts_with(b"Adobe") => {
                    self.adobe_transform = Some(segment[11])
                }
                0xDA => {
                    pos = self.scan(data, pos + len, segment)?;
                    self.scans += 1;
                    continue;
                }
                _ => {} // APPn, COM, DNL, DHP, EXP: nothing that changes the pixels
            }
            pos += len;
        }
    }

    fn frame(&mut self, s: &[u8], progressive: bool) -> Result<()> {
        if self.frame_seen {
            return corrupt("more than one frame header");
        }
        self.frame_seen = true;
        self.progressive = progressive;
        if s.len() < 6 {
            return corrupt("short frame header");
        }
        if s[0] != 8 {
            return Err(JpegError::Unsupported(format!("{}-bit samples", s[0])));
        }
        self.height = be16(s, 1)?;
        self.width = be16(s, 3)?;
        let n = s[5] as usize;
        if self.width == 0 || self.height == 0 {
            return Err(JpegError::Unsupported("image height defined by a DNL marker (or zero size)".into()));
        }
        if !matches!(n, 1 | 3 | 4) || s.len() < 6 + 3 * n {
            return Err(JpegError::Unsupported(format!("{n} components")));
        }
        for i in 0..n {
            let c = &s[6 + 3 * i..9 + 3 * i];
            let (h, v) = ((c[1] >> 4) as usize, (c[1] & 15) as usize);
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) || c[2] > 3 {
                return corrupt("bad sampling factors or quantisation table in the frame header");
            }
            self.components.push(Component { id: c[0], h, v, quant: c[2] as usize, ..Default::default() });
        }
        self.max_h = self.components.iter().map(|c| c.h).max().unwrap_or(1);
        self.max_v = self.components.iter().map(|c| c.v).max().unwrap_or(1);
        self.mcus_x = self.width.div_ceil(8 * self.max_h);
        self.mcus_y = self.height.div_ceil(8 * self.max_v);
        let (w, h, max_h, max_v) = (self.width, self.height, self.max_h, self.max_v);
        for c in &mut self.components {
            c.width = (w * c.h).div_ceil(max_h);
            c.height = (h * c.v).div_ceil(max_v);
            c.width_blocks = c.width.div_ceil(8);
            c.height_blocks = c.height.div_ceil(8);
            c.stride_blocks = self.mcus_x * c.h;
            c.rows_blocks = self.mcus_y * c.v;
            c.coefs = vec![0; c.stride_blocks * c.rows_blocks * 64];
        }
        Ok(())
    }

    fn quant_tables(&mut self, mut s: &[u8]) -> Result<()> {
        while !s.is_empty() {
            let (precision, id) = (s[0] >> 4, (s[0] & 15) as usize);
            let size = if precision == 0 { 64 } else { 128 };
            if id > 3 || s.len() < 1 + size {
                return corrupt("bad quantisation table");
            }
            let mut table = [0u16; 64];
            for k in 0..64 {
                let q = if precision == 0 { s[1 + k] as u16 } else { u16::from_be_bytes([s[1 + 2 * k], s[2 + 2 * k]]) };
                table[ZIGZAG[k]] = q;
            }
            self.quant[id] = Some(table);
            s = &s[1 + size..];
        }
        Ok(())
    }

    fn huffman_tables(&mut self, mut s: &[u8]) -> Result<()> {
        while !s.is_empty() {
            if s.len() < 17 {
                return corrupt("short Huffman table");
            }
            let (class, id) = (s[0] >> 4, (s[0] & 15) as usize);
            let counts: [u8; 16] = s[1..17].try_into().expect("16 bytes");
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            if class > 1 || id > 3 || s.len() < 17 + total {
                return corrupt("bad Huffman table");
            }
            let table = Huffman::new(&counts, s[17..17 + total].to_vec())?;
            if class == 0 {
                self.dc_tables[id] = Some(table);
            } else {
                self.ac_tables[id] = Some(table);
            }
            s = &s[17 + total..];
        }
        Ok(())
    }

    /// Decodes one scan whose header is `header` and whose data starts at `start`; returns the
    /// position after its data.
    fn scan(&mut self, data: &[u8], start: usize, header: &[u8]) -> Result<usize> {
        if !self.frame_seen {
            return corrupt("a scan before the frame header");
        }
        let n = *header.first().unwrap_or(&0) as usize;
        if n == 0 || n > 4 || header.len() < 1 + 2 * n + 3 {
            return corrupt("bad scan header");
        }
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let (id, tables) = (header[1 + 2 * i], header[2 + 2 * i]);
            let Some(ci) = self.components.iter().position(|c| c.id == id) else {
                return corrupt(format!("the scan names component {id}, which the frame does not have"));
            };
            members.push((ci, (tables >> 4) as usize & 3, (tables & 15) as usize & 3));
        }
        let p = 1 + 2 * n;
        let (ss, se, ah, al) = (header[p] as usize, header[p + 1] as usize, header[p + 2] >> 4, header[p + 2] & 15);
        if self.progressive {
            let bad = se > 63 || ss > se || (ss == 0 && se != 0) || (ss > 0 && n != 1) || al > 13;
            if bad {
                return corrupt("bad progressive scan parameters");
            }
        }
        // A sequential scan is decoded whatever Ss, Se, Ah and Al say (libjpeg only warns).
        // libjpeg latches a component's quantisation table when its first scan starts
        // (`latch_quant_tables`): a DQT that redefines the slot later, between scans, does not
        // change a component already under way.
        for &(ci, _, _) in &members {
            let c = &mut self.components[ci];
            if c.qtable.is_none() {
                match self.quant[c.quant] {
                    Some(table) => c.qtable = Some(table),
                    None => return corrupt("a component's quantisation table is missing"),
                }
            }
        }
        let kind = if !self.progressive {
            ScanKind::Sequential
        } else if ss == 0 {
            if ah == 0 {
                ScanKind::DcFirst
            } else {
                ScanKind::DcRefine
            }
        } else if ah == 0 {
            ScanKind::AcFirst
        } else {
            ScanKind::AcRefine
        };
        let needs_dc = matches!(kind, ScanKind::Sequential | ScanKind::DcFirst);
        let needs_ac = matches!(kind, ScanKind::Sequential | ScanKind::AcFirst | ScanKind::AcRefine);
        let mut dc = Vec::new();
        let mut ac = Vec::new();
        for &(_, d, a) in &members {
            let dct = if needs_dc { Some(self.dc_tables[d].clone().ok_or_else(|| missing("DC"))?) } else { None };
            let act = if needs_ac { Some(self.ac_tables[a].clone().ok_or_else(|| missing("AC"))?) } else { None };
            dc.push(dct);
            ac.push(act);
        }
        for c in &mut self.components {
            c.dc_pred = 0;
        }
        self.eob_run = 0;
        let params = ScanParams { kind, ss, se, al };
        let mut reader = BitReader::new(data, start);
        let ci0 = members[0].0;
        // One component: its own blocks in raster order; several: MCUs of h × v blocks each.
        let (mcus_x, mcus_y) = if n == 1 {
            (self.components[ci0].width_blocks, self.components[ci0].height_blocks)
        } else {
            (self.mcus_x, self.mcus_y)
        };
        let total = mcus_x * mcus_y;
        let mut restarts_left = self.restart_interval;
        // RST0..RST7 in turn, from RST0 in every scan.
        let mut next_restart = 0u8;
        for mcu in 0..total {
            if self.restart_interval > 0 {
                if restarts_left == 0 {
                    reader.restart(next_restart);
                    next_restart = (next_restart + 1) & 7;
                    for c in &mut self.components {
                        c.dc_pred = 0;
                    }
                    self.eob_run = 0;
                    restarts_left = self.restart_interval;
                }
                restarts_left -= 1;
            }
            // Data that ran out leaves the rest of the interval's MCUs as they are (zero, or an
            // earlier progressive scan's values), as libjpeg does: "uniform gray", not noise
            // decoded from zero bits.
            if reader.insufficient {
                continue;
            }
            let (mx, my) = (mcu % mcus_x, mcu / mcus_x);
            for (m, &(ci, _, _)) in members.iter().enumerate() {
                let (bh, bv) = if n == 1 { (1, 1) } else { (self.components[ci].h, self.components[ci].v) };
                for by in 0..bv {
                    for bx in 0..bh {
                        let (x, y) = (mx * bh + bx, my * bv + by);
                        let comp = &mut self.components[ci];
                        let at = (y * comp.stride_blocks + x) * 64;
                        let block: &mut [i16; 64] = (&mut comp.coefs[at..at + 64]).try_into().expect("64 coefficients");
                        decode_block(
                            &mut reader,
                            block,
                            &mut comp.dc_pred,
                            &mut self.eob_run,
                            dc[m].as_ref(),
                            ac[m].as_ref(),
                            &params,
                        );
                    }
                }
            }
        }
        let end = reader.end();
        self.warnings.append(&mut reader.warnings);
        Ok(end)
    }

    /// IDCT, upsampling and colour conversion of the decoded coefficients.
    fn output(&self) -> Result<JpegPixels> {
        let (w, h) = (self.width, self.height);
        let planes: Vec<Vec<u8>> = self
            .components
            .iter()
            .map(|c| {
                // A component no scan reached has no coefficients and no table (libjpeg's
                // multiplier table stays zero): mid grey.
                let samples = idct_component(c, &c.qtable.unwrap_or([0; 64]));
                upsample(c, &samples, self.max_h, self.max_v, w, h)
            })
            .collect::<Result<_>>()?;
        let (layout, samples) = match planes.len() {
            1 => (JpegLayout::Gray, planes.into_iter().next().expect("one plane")),
            3 => {
                let ids: Vec<u8> = self.components.iter().map(|c| c.id).collect();
                let rgb = if self.jfif {
                    false
                } else if let Some(t) = self.adobe_transform {
                    t == 0
                } else {
                    ids == [b'R', b'G', b'B']
                };
                let mut out = vec![0u8; w * h * 3];
                if rgb {
                    for (i, px) in out.chunks_exact_mut(3).enumerate() {
                        px.copy_from_slice(&[planes[0][i], planes[1][i], planes[2][i]]);
                    }
                } else {
                    let table = YccTable::new();
                    for (i, px) in out.chunks_exact_mut(3).enumerate() {
                        let (r, g, b) = table.rgb(planes[0][i], planes[1][i], planes[2][i]);
                        px.copy_from_slice(&[r, g, b]);
                    }
                }
                (JpegLayout::Rgb, out)
            }
            _ => {
                // Adobe transform 2 (and any other value but 0) is YCCK; no Adobe marker: CMYK.
                let ycck = self.adobe_transform.is_some_and(|t| t != 0);
                let table = YccTable::new();
                let mut out = vec![0u8; w * h * 4];
                for (i, px) in out.chunks_exact_mut(4).enumerate() {
                    if ycck {
                        let (r, g, b) = table.rgb(planes[0][i], planes[1][i], planes[2][i]);
                        px.copy_from_slice(&[255 - r, 255 - g, 255 - b, planes[3][i]]);
                    } else {
                        px.copy_from_slice(&[planes[0][i], planes[1][i], planes[2][i], planes[3][i]]);
                    }
                }
                (JpegLayout::Cmyk, out)
            }
        };
        Ok(JpegPixels { width: w as u32, height: h as u32, layout, samples, warnings: self.warnings.clone() })
    }
}

fn missing(class: &str) -> JpegError {
    JpegError::Corrupt(format!("a scan uses a {class} Huffman table that was never defined"))
}

#[derive(Clone, Copy, PartialEq)]
enum ScanKind {
    Sequential,
    DcFirst,
    DcRefine,
    AcFirst,
    AcRefine,
}

struct ScanParams {
    kind: ScanKind,
    ss: usize,
    se: usize,
    al: u8,
}

/// One block of one scan (libjpeg's `decode_mcu*` in `jdhuff.c` and `jdphuff.c`).
#[inline]
fn decode_block(
    r: &mut BitReader,
    block: &mut [i16; 64],
    dc_pred: &mut i32,
    eob_run: &mut u32,
    dc: Option<&Huffman>,
    ac: Option<&Huffman>,
    p: &ScanParams,
) {
    match p.kind {
        ScanKind::Sequential => {
            let s = r.decode(dc.expect("DC table"));
            *dc_pred = dc_pred.wrapping_add(r.receive_extend(s));
            block[0] = *dc_pred as i16;
            let ac = ac.expect("AC table");
            let mut k = 1;
            while k < 64 {
                if let Some((run, value)) = r.fast_ac(ac) {
                    k += run;
                    block[ZIGZAG[k.min(79)]] = value as i16;
                    k += 1;
                    continue;
                }
                let rs = r.decode(ac);
                let (run, size) = ((rs >> 4) as usize, rs & 15);
                if size != 0 {
                    k += run;
                    block[ZIGZAG[k.min(79)]] = r.receive_extend(size) as i16;
                } else if run == 15 {
                    k += 15;
                } else {
                    break;
                }
                k += 1;
            }
        }
        ScanKind::DcFirst => {
            let s = r.decode(dc.expect("DC table"));
            *dc_pred = dc_pred.wrapping_add(r.receive_extend(s));
            block[0] = (*dc_pred << p.al) as i16;
        }
        ScanKind::DcRefine => {
            if r.bit() {
                block[0] |= 1 << p.al;
            }
        }
        ScanKind::AcFirst => {
            if *eob_run > 0 {
                *eob_run -= 1;
                return;
            }
            let ac = ac.expect("AC table");
            let mut k = p.ss;
            while k <= p.se {
                let rs = r.decode(ac);
                let (run, size) = ((rs >> 4) as u32, rs & 15);
                if size != 0 {
                    k += run as usize;
                    block[ZIGZAG[k.min(79)]] = (r.receive_extend(size) << p.al) as i16;
                } else if run == 15 {
                    k += 15;
                } else {
                    *eob_run = (1 << run) - 1;
                    if run > 0 {
                        *eob_run += r.bits(run) as u32;
                    }
                    break;
                }
                k += 1;
            }
        }
        ScanKind::AcRefine => refine_ac(r, block, eob_run, ac.expect("AC table"), p),
    }
}

/// Successive-approximation refinement of AC coefficients (`decode_mcu_AC_refine`).
fn refine_ac(r: &mut BitReader, block: &mut [i16; 64], eob_run: &mut u32, ac: &Huffman, p: &ScanParams) {
    let p1: i16 = 1 << p.al;
    let m1: i16 = (-1i16).wrapping_shl(p.al as u32);
    let correct = |r: &mut BitReader, coef: &mut i16| {
        if r.bit() && (*coef & p1) == 0 {
            *coef = coef.wrapping_add(if *coef >= 0 { p1 } else { m1 });
        }
    };
    let mut k = p.ss;
    if *eob_run == 0 {
        while k <= p.se {
            let rs = r.decode(ac);
            let (mut run, size) = ((rs >> 4) as i32, rs & 15);
            let mut value = 0i16;
            if size != 0 {
                value = if r.bit() { p1 } else { m1 };
            } else if run != 15 {
                *eob_run = 1 << run;
                if run > 0 {
                    *eob_run += r.bits(run as u32) as u32;
                }
                break;
            }
            // Step over nonzero coefficients (refining each) and `run` zero ones.
            while k <= p.se {
                let coef = &mut block[ZIGZAG[k]];
                if *coef != 0 {
                    correct(r, coef);
                } else {
                    run -= 1;
                    if run < 0 {
                        break;
                    }
                }
                k += 1;
            }
            if value != 0 {
                block[ZIGZAG[k.min(79)]] = value;
            }
            k += 1;
        }
    }
    if *eob_run > 0 {
        while k <= p.se {
            let coef = &mut block[ZIGZAG[k]];
            if *coef != 0 {
                correct(r, coef);
            }
            k += 1;
        }
        *eob_run -= 1;
    }
}

// ---------------------------------------------------------------------------------------------
// IDCT (`jidctint.c`, `jpeg_idct_islow`)
//
// Both passes work on eight columns (pass 1) or eight rows (pass 2, on the transposed work array)
// at once, as `[i32; 8]` lanes the compiler turns into vector code. The arithmetic is that of
// libjpeg-turbo's SIMD islow IDCT (`jidctint-avx2.asm`, and its SSE2 and NEON twins), which is what
// Pillow runs: the same values as `jidctint.c` on valid data, but 16-bit where the C code is 32-bit
// — dequantised coefficients, the sums `in0 ± in4`, `in7 + in3` and `in5 + in1` wrap at 16 bits,
// each pass's outputs saturate to 16 bits, the samples saturate (no wrap-around of the C code's
// range-limit table). Damaged or wild data (Pillow's `hopper_bad_exif.jpg`) overflows those, and
// only this arithmetic gives Pillow's pixels there.

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;
const FIX_0_298631336: i32 = 2446;
const FIX_0_390180644: i32 = 3196;
const FIX_0_541196100: i32 = 4433;
const FIX_0_765366865: i32 = 6270;
const FIX_0_899976223: i32 = 7373;
const FIX_1_175875602: i32 = 9633;
const FIX_1_501321110: i32 = 12299;
const FIX_1_847759065: i32 = 15137;
const FIX_1_961570560: i32 = 16069;
const FIX_2_053119869: i32 = 16819;
const FIX_2_562915447: i32 = 20995;
const FIX_3_072711026: i32 = 25172;

type Lanes = [i32; 8];

// Plain loops over the eight lanes (not closures), which the compiler unrolls and vectorises.

#[inline(always)]
fn add(mut a: Lanes, b: Lanes) -> Lanes {
    for i in 0..8 {
        a[i] = a[i].wrapping_add(b[i]);
    }
    a
}

#[inline(always)]
fn sub(mut a: Lanes, b: Lanes) -> Lanes {
    for i in 0..8 {
        a[i] = a[i].wrapping_sub(b[i]);
    }
    a
}

#[inline(always)]
fn mul(mut a: Lanes, c: i32) -> Lanes {
    for x in &mut a {
        *x = x.wrapping_mul(c);
    }
    a
}

#[inline(always)]
fn shl(mut a: Lanes, n: u32) -> Lanes {
    for x in &mut a {
        *x = x.wrapping_shl(n);
    }
    a
}

/// libjpeg's `DESCALE`: a rounded arithmetic right shift.
#[inline(always)]
fn descale(mut a: Lanes, n: u32) -> Lanes {
    for x in &mut a {
        *x = x.wrapping_add(1 << (n - 1)) >> n;
    }
    a
}

/// Values as a 16-bit register holds them: wrapped (`vpaddw`, `vpmullw`).
#[inline(always)]
fn wrap16(mut a: Lanes) -> Lanes {
    for x in &mut a {
        *x = *x as i16 as i32;
    }
    a
}

/// A pass's rounded outputs packed to 16 bits with signed saturation (`vpackssdw`).
#[inline(always)]
fn descale_sat16(a: Lanes, n: u32) -> Lanes {
    let mut a = descale(a, n);
    for x in &mut a {
        *x = (*x).clamp(i16::MIN as i32, i16::MAX as i32);
    }
    a
}

/// A final value as a sample: saturated to −128..127 (`vpacksswb`), then centred (`+ 128`).
#[inline(always)]
fn to_sample(v: i32) -> u8 {
    (v.clamp(-128, 127) + 128) as u8
}

/// One 1-D islow pass over eight lanes of 16-bit inputs, as `DODCT` computes it: the even part
/// from inputs 0, 2, 4, 6, the odd part from 1, 3, 5, 7 (products of 16-bit values and 32-bit
/// sums, regrouped as the SIMD code does, which is exact), descaled by `n` bits and saturated.
#[inline(always)]
fn idct_1d(i: [Lanes; 8], n: u32) -> [Lanes; 8] {
    // Even part: tmp3 = z2·(c541 + c765) + z3·c541, tmp2 = z2·c541 + z3·(c541 − c1847).
    let tmp3 = add(mul(i[2], FIX_0_541196100 + FIX_0_765366865), mul(i[6], FIX_0_541196100));
    let tmp2 = add(mul(i[2], FIX_0_541196100), mul(i[6], FIX_0_541196100 - FIX_1_847759065));
    let tmp0 = shl(wrap16(add(i[0], i[4])), CONST_BITS);
    let tmp1 = shl(wrap16(sub(i[0], i[4])), CONST_BITS);
    let (tmp10, tmp13, tmp11, tmp12) = (add(tmp0, tmp3), sub(tmp0, tmp3), add(tmp1, tmp2), sub(tmp1, tmp2));

    // Odd part, on z3 = in7 + in3 and z4 = in5 + in1 (16-bit sums).
    let z3 = wrap16(add(i[7], i[3]));
    let z4 = wrap16(add(i[5], i[1]));
    let z3 = add(mul(z3, FIX_1_175875602 - FIX_1_961570560), mul(z4, FIX_1_175875602));
    let z4 = add(mul(wrap16(add(i[7], i[3])), FIX_1_175875602), mul(z4, FIX_1_175875602 - FIX_0_390180644));
    let t0 = add(add(mul(i[7], FIX_0_298631336 - FIX_0_899976223), mul(i[1], -FIX_0_899976223)), z3);
    let t1 = add(add(mul(i[5], FIX_2_053119869 - FIX_2_562915447), mul(i[3], -FIX_2_562915447)), z4);
    let t2 = add(add(mul(i[5], -FIX_2_562915447), mul(i[3], FIX_3_072711026 - FIX_2_562915447)), z3);
    let t3 = add(add(mul(i[7], -FIX_0_899976223), mul(i[1], FIX_1_501321110 - FIX_0_899976223)), z4);
    [
        descale_sat16(add(tmp10, t3), n),
        descale_sat16(add(tmp11, t2), n),
        descale_sat16(add(tmp12, t1), n),
        descale_sat16(add(tmp13, t0), n),
        descale_sat16(sub(tmp13, t0), n),
        descale_sat16(sub(tmp12, t1), n),
        descale_sat16(sub(tmp11, t2), n),
        descale_sat16(sub(tmp10, t3), n),
    ]
}

#[inline(always)]
fn transpose(m: [Lanes; 8]) -> [Lanes; 8] {
    let mut t = [[0; 8]; 8];
    for (r, row) in m.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c][r] = v;
        }
    }
    t
}

/// Dequantises and inverse-transforms one block into 8 rows of `out` (row stride `stride`).
#[inline(always)]
fn idct_block(coefs: &[i16], quant: &[u16; 64], out: &mut [u8], stride: usize) {
    // `vpmullw`: the low 16 bits of the product.
    let dequantised = |k: usize| (coefs[k] as i32).wrapping_mul(quant[k] as i32) as i16 as i32;
    let work = if coefs[8..64].iter().all(|&c| c == 0) {
        // Rows 1..7 all zero (the SIMD code's shortcut, not the C code's per-column one): pass 1
        // gives each column its row-0 value times 2^PASS1_BITS, shifted in 16 bits (`vpsllw`).
        let row: Lanes = std::array::from_fn(|c| (dequantised(c) << PASS1_BITS) as i16 as i32);
        if row[1..].iter().all(|&v| v == 0) {
            // DC only (most blocks of smooth areas): pass 2 of a row holding only its first
            // value gives that value, descaled, everywhere.
            let v = to_sample(descale_sat16([row[0] << CONST_BITS; 8], CONST_BITS + PASS1_BITS + 3)[0]);
            for line in out.chunks_mut(stride).take(8) {
                line[..8].fill(v);
            }
            return;
        }
        [row; 8]
    } else {
        // Pass 1 on columns: lane c of row r is coefficient (r, c).
        let mut rows = [[0i32; 8]; 8];
        for (r, row) in rows.iter_mut().enumerate() {
            for (c, x) in row.iter_mut().enumerate() {
                *x = dequantised(r * 8 + c);
            }
        }
        idct_1d(rows, CONST_BITS - PASS1_BITS)
    };
    // Pass 2 on rows: after the transpose, lane r of input k is work value (r, k).
    let samples = idct_1d(transpose(work), CONST_BITS + PASS1_BITS + 3);
    for (lanes, line) in transpose(samples).iter().zip(out.chunks_mut(stride)) {
        let mut bytes = [0u8; 8];
        for (x, &v) in bytes.iter_mut().zip(lanes) {
            *x = to_sample(v);
        }
        line[..8].copy_from_slice(&bytes);
    }
}

/// The component's samples: `width_blocks·8 × height_blocks·8`, row-major.
fn idct_component(c: &Component, quant: &[u16; 64]) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { idct_component_avx2(c, quant) };
    }
    idct_component_portable(c, quant)
}

/// [`idct_component_portable`] compiled for AVX2 (eight 32-bit lanes a register).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn idct_component_avx2(c: &Component, quant: &[u16; 64]) -> Vec<u8> {
    idct_component_portable(c, quant)
}

#[inline(always)]
fn idct_component_portable(c: &Component, quant: &[u16; 64]) -> Vec<u8> {
    let stride = c.width_blocks * 8;
    let mut out = vec![0u8; stride * c.height_blocks * 8];
    for by in 0..c.height_blocks {
        for bx in 0..c.width_blocks {
            let at = (by * c.stride_blocks + bx) * 64;
            idct_block(&c.coefs[at..at + 64], quant, &mut out[by * 8 * stride + bx * 8..], stride);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Upsampling (`jdsample.c`, fancy) and colour conversion (`jdcolor.c`)

/// A full-size `w × h` plane of component `c` from its samples (`width_blocks·8` per row), the way
/// libjpeg-turbo's upsampler chooses: 1:1 copy; 2h1v, 1h2v and 2h2v "fancy" triangular filters (with
/// the last real row repeated below the image and the first above it); box replication for other
/// integral factors.
fn upsample(c: &Component, samples: &[u8], max_h: usize, max_v: usize, w: usize, h: usize) -> Result<Vec<u8>> {
    let stride = c.width_blocks * 8;
    let (dw, dh) = (c.width, c.height);
    // Row `y` of the component, with rows past its height repeating its last and rows above 0
    // repeating row 0 (libjpeg's context rows).
    let row = |y: isize| -> &[u8] {
        let y = y.clamp(0, dh as isize - 1) as usize;
        &samples[y * stride..y * stride + dw]
    };
    let mut out = vec![0u8; w * h];
    let (hx, vx) = (c.h, c.v);
    if hx == max_h && vx == max_v {
        for y in 0..h {
            out[y * w..y * w + w].copy_from_slice(&row(y as isize)[..w]);
        }
    } else if hx * 2 == max_h && vx == max_v {
        let mut line = vec![0u8; dw * 2];
        for y in 0..h {
            if dw > 2 {
                h2v1_fancy(row(y as isize), &mut line);
            } else {
                for (x, v) in line.iter_mut().enumerate() {
                    *v = row(y as isize)[x / 2];
                }
            }
            out[y * w..y * w + w].copy_from_slice(&line[..w]);
        }
    } else if hx == max_h && vx * 2 == max_v {
        // 1h2v: fancy vertically (libjpeg-turbo takes this path whenever fancy upsampling is on).
        for y in 0..h {
            let (near, far, bias) = if y % 2 == 0 {
                (row(y as isize / 2), row(y as isize / 2 - 1), 1)
            } else {
                (row(y as isize / 2), row(y as isize / 2 + 1), 2)
            };
            for x in 0..w {
                out[y * w + x] = ((near[x] as u32 * 3 + far[x] as u32 + bias) >> 2) as u8;
            }
        }
    } else if hx * 2 == max_h && vx * 2 == max_v {
        let mut line = vec![0u8; dw * 2];
        for y in 0..h {
            let near = row(y as isize / 2);
            let far = if y % 2 == 0 { row(y as isize / 2 - 1) } else { row(y as isize / 2 + 1) };
            if dw > 2 {
                h2v2_fancy(near, far, &mut line);
            } else {
                for (x, v) in line.iter_mut().enumerate() {
                    *v = near[x / 2];
                }
            }
            out[y * w..y * w + w].copy_from_slice(&line[..w]);
        }
    } else if max_h.is_multiple_of(hx) && max_v.is_multiple_of(vx) {
        let (fx, fy) = (max_h / hx, max_v / vx);
        for y in 0..h {
            let src = row((y / fy) as isize);
            for x in 0..w {
                out[y * w + x] = src[x / fx];
            }
        }
    } else {
        return Err(JpegError::Unsupported(format!(
            "fractional sampling factors ({hx}×{vx} in a {max_h}×{max_v} MCU)"
        )));
    }
    Ok(out)
}

/// `h2v1_fancy_upsample`: each output pair is ¾ of its sample and ¼ of the neighbour, rounding
/// alternately down and up.
fn h2v1_fancy(input: &[u8], out: &mut [u8]) {
    let n = input.len();
    let s = |i: usize| input[i] as u32;
    out[0] = input[0];
    out[1] = ((s(0) * 3 + s(1) + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let v = s(i) * 3;
        out[2 * i] = ((v + s(i - 1) + 1) >> 2) as u8;
        out[2 * i + 1] = ((v + s(i + 1) + 2) >> 2) as u8;
    }
    out[2 * n - 2] = ((s(n - 1) * 3 + s(n - 2) + 1) >> 2) as u8;
    out[2 * n - 1] = input[n - 1];
}

/// `h2v2_fancy_upsample`: the vertical ¾/¼ column sums, then the horizontal ¾/¼ filter on them
/// (biases 8 and 7 alternate).
fn h2v2_fancy(near: &[u8], far: &[u8], out: &mut [u8]) {
    let n = near.len();
    let sum = |i: usize| near[i] as u32 * 3 + far[i] as u32;
    let (mut last, mut this) = (sum(0), sum(0));
    out[0] = ((this * 4 + 8) >> 4) as u8;
    for i in 0..n {
        let next = if i + 1 < n { sum(i + 1) } else { this };
        if i > 0 {
            out[2 * i] = ((this * 3 + last + 8) >> 4) as u8;
        }
        out[2 * i + 1] = if i + 1 < n { ((this * 3 + next + 7) >> 4) as u8 } else { ((this * 4 + 7) >> 4) as u8 };
        last = this;
        this = next;
    }
}

/// libjpeg's YCbCr → RGB tables (16-bit fixed point, `build_ycc_rgb_table`).
struct YccTable {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i64; 256],
    cb_g: [i64; 256],
}

impl YccTable {
    fn new() -> Self {
        const SCALEBITS: u32 = 16;
        const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
        let fix = |x: f64| (x * (1i64 << SCALEBITS) as f64 + 0.5) as i64;
        let mut t = Self { cr_r: [0; 256], cb_b: [0; 256], cr_g: [0; 256], cb_g: [0; 256] };
        for i in 0..256 {
            let x = i as i64 - 128;
            t.cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cr_g[i] = -fix(0.71414) * x;
            t.cb_g[i] = -fix(0.34414) * x + ONE_HALF;
        }
        t
    }

    #[inline]
    fn rgb(&self, y: u8, cb: u8, cr: u8) -> (u8, u8, u8) {
        let y = y as i32;
        let (cb, cr) = (cb as usize, cr as usize);
        let g = ((self.cb_g[cb] + self.cr_g[cr]) >> 16) as i32;
        let clamp = |v: i32| v.clamp(0, 255) as u8;
        (clamp(y + self.cr_r[cr]), clamp(y + g), clamp(y + self.cb_b[cb]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The islow IDCT against the DCT's definition in f64: the integer algorithm is accurate to well
    /// under one level on ordinary blocks.
    #[test]
    fn islow_idct_is_close_to_the_exact_inverse() {
        let mut state = 7u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            let mut coefs = [0i16; 64];
            coefs[0] = (next() % 1000) as i16 - 500;
            for c in &mut coefs[1..] {
                if next() % 3 == 0 {
                    *c = (next() % 60) as i16 - 30;
                }
            }
            let quant = [1u16; 64];
            let mut out = [0u8; 64];
            idct_block(&coefs, &quant, &mut out, 8);
            for y in 0..8 {
                for x in 0..8 {
                    let mut s = 0.0;
                    for v in 0..8 {
                        for u in 0..8 {
                            let cu = if u == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
                            let cv = if v == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
                            s += cu
                                * cv
                                * coefs[v * 8 + u] as f64
                                * (((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI) / 16.0).cos()
                                * (((2 * y + 1) as f64 * v as f64 * std::f64::consts::PI) / 16.0).cos();
                        }
                    }
                    let exact = (s / 4.0 + 128.0).round().clamp(0.0, 255.0);
                    let got = out[y * 8 + x] as f64;
                    assert!((got - exact).abs() <= 1.0, "({x},{y}): {got} vs {exact}");
                }
            }
        }
    }

    /// The SIMD IDCT saturates where the C code's range-limit table wraps (|v| ≥ 512), and its
    /// 16-bit sums wrap: a block whose only AC term makes the sum of rows 0 and 4 overflow gives
    /// the SIMD values, not the 32-bit ones.
    #[test]
    fn wild_blocks_follow_the_simd_arithmetic() {
        assert_eq!((to_sample(-129), to_sample(-128), to_sample(0), to_sample(127)), (0, 0, 128, 255));
        assert_eq!((to_sample(600), to_sample(-600)), (255, 0), "saturated, not wrapped");
        // DC 1000 at quantiser 8: 8000 · 4 = 32000 fits 16 bits; its value is 8000 / 8 = 1000 → 255.
        let mut coefs = [0i16; 64];
        coefs[0] = 1000;
        let mut out = [0u8; 64];
        idct_block(&coefs, &[8; 64], &mut out, 8);
        assert!(out.iter().all(|&v| v == 255), "{out:?}");
        // DC 1100 at quantiser 8: 8800 · 4 = 35200 wraps to −30336 in 16 bits → black.
        coefs[0] = 1100;
        idct_block(&coefs, &[8; 64], &mut out, 8);
        assert!(out.iter().all(|&v| v == 0), "{out:?}");
        // in0 + in4 = 20000 + 20000 wraps to −25536 in 16 bits: rows 0, 3, 4, 7 of pass 1 saturate
        // at −32768 and come out black (the C code: 160000 in pass 1, sample 8 after its table).
        let mut coefs = [0i16; 64];
        coefs[0] = 20000;
        coefs[32] = 20000;
        idct_block(&coefs, &[1; 64], &mut out, 8);
        let column: Vec<u8> = (0..8).map(|r| out[r * 8]).collect();
        assert_eq!(column, [0, 128, 128, 0, 0, 128, 128, 0]);
    }

    #[test]
    fn fancy_filters_follow_jdsample() {
        let mut out = [0u8; 8];
        h2v1_fancy(&[0, 100, 200, 40], &mut out);
        // First/last copy the edge sample; inside: (3·near + far + 1|2) >> 2.
        assert_eq!(out, [0, 25, 75, 125, 175, 160, 80, 40]);
        let mut out = [0u8; 6];
        h2v2_fancy(&[10, 50, 90], &[30, 30, 30], &mut out);
        // Column sums 60, 180, 300; edges (4·s + 8|7) >> 4; inside (3·s + neighbour + 8|7) >> 4.
        assert_eq!(out, [15, 22, 38, 52, 68, 75]);
    }

    #[test]
    fn ycc_tables_match_libjpeg() {
        let t = YccTable::new();
        // Grey stays grey; the extremes saturate as libjpeg's tables do.
        assert_eq!(t.rgb(128, 128, 128), (128, 128, 128));
        assert_eq!(t.rgb(255, 255, 255), (255, 121, 255));
        assert_eq!(t.rgb(0, 0, 0), (0, 135, 0));
        assert_eq!(t.cr_r[255], 178); // round(1.402 · 127)
    }

    /// Found by fuzzing: a table with more codes of a length than that many bits can hold indexed
    /// past the lookahead table. libjpeg refuses such tables, and so do we.
    #[test]
    fn over_subscribed_huffman_tables_are_refused() {
        let mut counts = [0u8; 16];
        counts[0] = 3; // three 1-bit codes
        assert!(matches!(Huffman::new(&counts, vec![1, 2, 3]), Err(JpegError::Corrupt(_))));
        counts[0] = 2; // two 1-bit codes use up the code space: no all-ones code left
        assert!(Huffman::new(&counts, vec![1, 2]).is_err());
        counts[0] = 1;
        counts[1] = 2;
        assert!(Huffman::new(&counts, vec![1, 2, 3]).is_err());
        counts[1] = 1;
        assert!(Huffman::new(&counts, vec![1, 2]).is_ok());
    }

    #[test]
    fn refuses_what_is_not_a_jpeg() {
        assert!(matches!(decode_jpeg(b"\x89PNG\r\n"), Err(JpegError::Corrupt(_))));
        assert!(matches!(decode_jpeg(&[0xFF, 0xD8, 0xFF, 0xD9]), Err(JpegError::Corrupt(_))));
    }
}
