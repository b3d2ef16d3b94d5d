//! GGUF validation: a pure check of a file's header, metadata and tensor table, so that a
//! malformed model is refused with a reason before llama.cpp (whose own checks end in an abort
//! for some inputs) ever sees it.
//!
//! [`parse`] is a function over bytes: it never panics, allocates nothing in proportion to a
//! count or length the file claims (only in proportion to bytes actually present: the set of
//! names seen, to refuse duplicates), and reads nothing beyond the slice. It checks what
//! llama.cpp's `gguf.cpp` checks when it opens a file, in the same order, plus that the data
//! section ends inside the file. [`parse_prefix`] does the same over the first bytes of a larger
//! file and says when it needs more of them; [`check_file`] drives it over a file on disk,
//! reading only the header and metadata (a few MB), never the weights.
//!
//! What this cannot see — a well-formed file whose hyperparameters make llama.cpp abort — is what
//! the trial load in a child process (`koubou_llama::check`) is for. This crate is apart from
//! koubou-llama so that it builds without llama.cpp: the fuzz target `gguf` (`fuzz/`) runs it alone.

use std::{
    collections::HashSet,
    fmt,
    fs::File,
    io::{self, Read, Seek},
    path::Path,
};

/// The GGUF magic bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Longest string llama.cpp accepts in a GGUF file.
pub const MAX_STRING_LEN: u64 = 1 << 30;
/// Most elements llama.cpp accepts in one metadata array.
pub const MAX_ARRAY_LEN: u64 = 1 << 30;
/// Tensor names must be shorter than this (llama.cpp's `GGML_MAX_NAME`).
pub const MAX_NAME_LEN: usize = 64;
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// [`check_file`] refuses files whose header and metadata need more than this many bytes.
pub const MAX_METADATA_BYTES: usize = 512 << 20;

/// Smallest possible encoding of one tensor-table entry (empty name, no dimensions): name
/// length, `n_dims`, type, offset.
const MIN_TENSOR_INFO: u64 = 8 + 4 + 4 + 8;
/// Smallest possible encoding of one metadata entry: key length, a 1-byte key, type, a 1-byte value.
const MIN_KV: u64 = 8 + 1 + 4 + 1;
const HEADER_LEN: u64 = 4 + 4 + 8 + 8;

/// What a valid file holds, in brief.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub version: u32,
    pub n_tensors: u64,
    pub n_kv: u64,
    /// `general.architecture`, when it is a string.
    pub architecture: Option<String>,
    /// `general.name`, when it is a string.
    pub name: Option<String>,
    pub alignment: u64,
    /// Where the tensor data starts, and how many bytes it takes (padding included).
    pub data_offset: u64,
    pub data_size: u64,
}

/// Why a file is not a valid GGUF model, and where in it the problem is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} (at byte {offset})")]
pub struct GgufError {
    /// Byte offset of the field at fault.
    pub offset: u64,
    pub kind: ErrorKind,
}

/// The ways a GGUF file can be malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file ends inside `what`.
    Truncated {
        what: String,
        file_len: u64,
    },
    BadMagic([u8; 4]),
    /// Version 0, 1 (no longer read by llama.cpp), above 3, or byte-swapped.
    UnsupportedVersion(u32),
    /// The header claims more entries than the file has bytes for.
    TooMany {
        what: &'static str,
        count: u64,
        max: u64,
    },
    EmptyKey {
        index: u64,
    },
    DuplicateKey(String),
    BadValueType {
        key: String,
        value_type: u32,
    },
    /// An array of arrays (llama.cpp reads none).
    NestedArray {
        key: String,
    },
    StringTooLong {
        len: u64,
    },
    ArrayTooLong {
        key: String,
        len: u64,
    },
    /// A key llama.cpp reads with a typed getter (which aborts on a mismatch) has another type.
    WrongKeyType {
        key: &'static str,
        expected: &'static str,
        found: String,
    },
    BadAlignment(u32),
    TensorNameTooLong {
        index: u64,
        len: u64,
    },
    DuplicateTensor(String),
    TooManyDims {
        tensor: String,
        n_dims: u32,
    },
    NegativeDim {
        tensor: String,
        dim: u32,
        value: i64,
    },
    ShapeOverflow {
        tensor: String,
    },
    BadTensorType {
        tensor: String,
        ggml_type: u32,
    },
    RowNotBlockMultiple {
        tensor: String,
        ggml_type: &'static str,
        row: i64,
        block: u64,
    },
    TensorTooLarge {
        tensor: String,
    },
    MisalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    UnexpectedOffset {
        tensor: String,
        offset: u64,
        expected: u64,
    },
    /// The tensor data would end past the end of the file.
    DataPastEnd {
        data_end: u64,
        file_len: u64,
    },
    /// [`parse_prefix`] only: the slice ends before the metadata does; read at least `need`
    /// bytes and try again.
    NeedMore {
        need: u64,
    },
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Truncated { what, file_len } => {
                write!(f, "the file ends ({file_len} bytes) inside {what}: it is truncated")
            }
            ErrorKind::BadMagic(m) => {
                write!(f, "it does not start with \"GGUF\" (found {:?}): not a GGUF file", String::from_utf8_lossy(m))
            }
            ErrorKind::UnsupportedVersion(v) => write!(
                f,
                "GGUF version {v} is not supported (llama.cpp reads versions 2 and 3{})",
                if v & 0xFFFF == 0 && *v != 0 { "; this looks byte-swapped (big-endian file?)" } else { "" }
            ),
            ErrorKind::TooMany { what, count, max } => {
                write!(f, "the header claims {count} {what}, but the file has room for at most {max}")
            }
            ErrorKind::EmptyKey { index } => write!(f, "metadata key #{index} is empty"),
            ErrorKind::DuplicateKey(k) => write!(f, "metadata key {k:?} appears twice"),
            ErrorKind::BadValueType { key, value_type } => {
                write!(f, "metadata key {key:?} has an unknown value type {value_type}")
            }
            ErrorKind::NestedArray { key } => write!(f, "metadata key {key:?} is an array of arrays"),
            ErrorKind::StringTooLong { len } => {
                write!(f, "a string claims {len} bytes, more than the {MAX_STRING_LEN} llama.cpp accepts")
            }
            ErrorKind::ArrayTooLong { key, len } => write!(
                f,
                "metadata array {key:?} claims {len} elements, more than the {MAX_ARRAY_LEN} llama.cpp accepts"
            ),
            ErrorKind::WrongKeyType { key, expected, found } => {
                write!(f, "metadata key {key:?} must be {expected}, not {found}")
            }
            ErrorKind::BadAlignment(a) => write!(f, "general.alignment {a} is not a power of two"),
            ErrorKind::TensorNameTooLong { index, len } => {
                write!(f, "tensor #{index} has a {len}-byte name (at most {} bytes)", MAX_NAME_LEN - 1)
            }
            ErrorKind::DuplicateTensor(t) => write!(f, "tensor {t:?} appears twice"),
            ErrorKind::TooManyDims { tensor, n_dims } => {
                write!(f, "tensor {tensor:?} has {n_dims} dimensions (at most {MAX_DIMS})")
            }
            ErrorKind::NegativeDim { tensor, dim, value } => {
                write!(f, "tensor {tensor:?} dimension {dim} is {value}")
            }
            ErrorKind::ShapeOverflow { tensor } => write!(f, "tensor {tensor:?} has more elements than fit in 64 bits"),
            ErrorKind::BadTensorType { tensor, ggml_type } => {
                write!(f, "tensor {tensor:?} has an unknown or removed ggml type {ggml_type}")
            }
            ErrorKind::RowNotBlockMultiple { tensor, ggml_type, row, block } => write!(
                f,
                "tensor {tensor:?} ({ggml_type}) has rows of {row} elements, not a multiple of its block size {block}"
            ),
            ErrorKind::TensorTooLarge { tensor } => write!(f, "tensor {tensor:?} is larger than 2^64 bytes"),
            ErrorKind::MisalignedOffset { tensor, offset, alignment } => {
                write!(
                    f,
                    "tensor {tensor:?} starts at data offset {offset}, not a multiple of the alignment {alignment}"
                )
            }
            ErrorKind::UnexpectedOffset { tensor, offset, expected } => write!(
                f,
                "tensor {tensor:?} starts at data offset {offset}, but the tensors before it end at {expected}"
            ),
            ErrorKind::DataPastEnd { data_end, file_len } => write!(
                f,
                "the tensor data ends at byte {data_end}, past the end of the file ({file_len} bytes): it is truncated"
            ),
            ErrorKind::NeedMore { need } => write!(f, "need at least {need} bytes of the file"),
        }
    }
}

/// The ggml tensor types a GGUF file may use: (id, name, elements per block, bytes per block).
/// Ids 4, 5 and 31–33, 36–38 were removed from ggml and are refused, as llama.cpp refuses them.
/// koubou-llama's `check::tests::gguf_type_table_matches_ggml` checks this against the linked ggml.
pub const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "f32", 1, 4),
    (1, "f16", 1, 2),
    (2, "q4_0", 32, 18),
    (3, "q4_1", 32, 20),
    (6, "q5_0", 32, 22),
    (7, "q5_1", 32, 24),
    (8, "q8_0", 32, 34),
    (9, "q8_1", 32, 36),
    (10, "q2_K", 256, 84),
    (11, "q3_K", 256, 110),
    (12, "q4_K", 256, 144),
    (13, "q5_K", 256, 176),
    (14, "q6_K", 256, 210),
    (15, "q8_K", 256, 292),
    (16, "iq2_xxs", 256, 66),
    (17, "iq2_xs", 256, 74),
    (18, "iq3_xxs", 256, 98),
    (19, "iq1_s", 256, 50),
    (20, "iq4_nl", 32, 18),
    (21, "iq3_s", 256, 110),
    (22, "iq2_s", 256, 82),
    (23, "iq4_xs", 256, 136),
    (24, "i8", 1, 1),
    (25, "i16", 1, 2),
    (26, "i32", 1, 4),
    (27, "i64", 1, 8),
    (28, "f64", 1, 8),
    (29, "iq1_m", 256, 56),
    (30, "bf16", 1, 2),
    (34, "tq1_0", 256, 54),
    (35, "tq2_0", 256, 66),
    (39, "mxfp4", 32, 17),
    (40, "nvfp4", 64, 36),
    (41, "q1_0", 128, 18),
    (42, "q2_0", 64, 18),
];

fn ggml_type(id: u32) -> Option<(&'static str, u64, u64)> {
    GGML_TYPES.iter().find(|t| t.0 == id).map(|t| (t.1, t.2, t.3))
}

/// GGUF metadata value types.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;

    /// Bytes of one fixed-size value; `None` for strings, arrays and unknown types.
    pub fn size(t: u32) -> Option<u64> {
        match t {
            U8 | I8 | BOOL => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            _ => None,
        }
    }

    pub fn name(t: u32) -> &'static str {
        match t {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            BOOL => "bool",
            STRING => "a string",
            ARRAY => "an array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
            _ => "unknown",
        }
    }
}

/// Checks a whole GGUF file held in memory (the fuzzing entry point).
pub fn parse(bytes: &[u8]) -> Result<Summary, GgufError> {
    parse_prefix(bytes, bytes.len() as u64)
}

/// Checks a GGUF file of `file_len` bytes from its first bytes, `data` (`data.len() <= file_len`).
/// When `data` ends before the metadata and tensor table do, fails with
/// [`ErrorKind::NeedMore`]; past `file_len`, with [`ErrorKind::Truncated`].
pub fn parse_prefix(data: &[u8], file_len: u64) -> Result<Summary, GgufError> {
    let file_len = file_len.max(data.len() as u64);
    let mut r = Reader { data, pos: 0, file_len };

    let magic = r.bytes(4, "the magic bytes")?;
    if magic != MAGIC {
        let mut m = [0u8; 4];
        m.copy_from_slice(magic);
        return Err(r.err_at(0, ErrorKind::BadMagic(m)));
    }
    let version = r.u32("the version")?;
    if version == 0 || version == 1 || version > 3 {
        return Err(r.err_at(4, ErrorKind::UnsupportedVersion(version)));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    // Every entry takes bytes: a count the file cannot hold is refused before anything is read.
    let room = file_len.saturating_sub(HEADER_LEN);
    let max_kv = room / MIN_KV;
    if n_kv > max_kv {
        return Err(r.err_at(16, ErrorKind::TooMany { what: "metadata entries", count: n_kv, max: max_kv }));
    }
    let max_tensors = room / MIN_TENSOR_INFO;
    if n_tensors > max_tensors {
        return Err(r.err_at(8, ErrorKind::TooMany { what: "tensors", count: n_tensors, max: max_tensors }));
    }

    let mut keys: HashSet<&[u8]> = HashSet::new();
    let mut architecture = None;
    let mut name = None;
    let mut alignment = DEFAULT_ALIGNMENT;
    for index in 0..n_kv {
        let key_at = r.pos;
        let key = r.string("a metadata key")?;
        if key.is_empty() {
            return Err(r.err_at(key_at, ErrorKind::EmptyKey { index }));
        }
        if !keys.insert(key) {
            return Err(r.err_at(key_at, ErrorKind::DuplicateKey(lossy(key))));
        }
        let type_at = r.pos;
        let ty = r.u32("a metadata value type")?;
        match ty {
            value_type::ARRAY => {
                let elem_at = r.pos;
                let elem = r.u32("an array element type")?;
                let len_at = r.pos;
                let n = r.u64("an array length")?;
                if n > MAX_ARRAY_LEN {
                    return Err(r.err_at(len_at, ErrorKind::ArrayTooLong { key: lossy(key), len: n }));
                }
                match elem {
                    value_type::STRING => {
                        for _ in 0..n {
                            r.string("a string in a metadata array")?;
                        }
                    }
                    value_type::ARRAY => return Err(r.err_at(elem_at, ErrorKind::NestedArray { key: lossy(key) })),
                    t => match value_type::size(t) {
                        Some(size) => {
                            r.skip(n.saturating_mul(size), "a metadata array")?;
                        }
                        None => {
                            return Err(r.err_at(elem_at, ErrorKind::BadValueType { key: lossy(key), value_type: t }));
                        }
                    },
                }
                check_key_type(key, "an array", type_at, &r)?;
            }
            value_type::STRING => {
                let s = r.string("a metadata string")?;
                match key {
                    b"general.architecture" => architecture = Some(lossy(s)),
                    b"general.name" => name = Some(lossy(s)),
                    _ => {}
                }
                check_key_type(key, value_type::name(ty), type_at, &r)?;
            }
            t => {
                let Some(size) = value_type::size(t) else {
                    return Err(r.err_at(type_at, ErrorKind::BadValueType { key: lossy(key), value_type: t }));
                };
                let value_at = r.pos;
                let v = r.bytes(size, "a metadata value")?;
                check_key_type(key, value_type::name(t), type_at, &r)?;
                if key == b"general.alignment" {
                    let a = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                    if a == 0 || !a.is_power_of_two() {
                        return Err(r.err_at(value_at, ErrorKind::BadAlignment(a)));
                    }
                    alignment = u64::from(a);
                }
            }
        }
    }

    let mut names: HashSet<&[u8]> = HashSet::new();
    let mut expected = 0u64;
    for index in 0..n_tensors {
        let name_at = r.pos;
        let tname = r.string("a tensor name")?;
        if tname.len() >= MAX_NAME_LEN {
            return Err(r.err_at(name_at, ErrorKind::TensorNameTooLong { index, len: tname.len() as u64 }));
        }
        if !names.insert(tname) {
            return Err(r.err_at(name_at, ErrorKind::DuplicateTensor(lossy(tname))));
        }
        let tensor = || lossy(tname);
        let dims_at = r.pos;
        let n_dims = r.u32("a tensor's dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(r.err_at(dims_at, ErrorKind::TooManyDims { tensor: tensor(), n_dims }));
        }
        let mut ne = [1i64; MAX_DIMS as usize];
        for (dim, slot) in ne.iter_mut().enumerate().take(n_dims as usize) {
            let at = r.pos;
            let v = r.u64("a tensor dimension")? as i64;
            if v < 0 {
                return Err(r.err_at(at, ErrorKind::NegativeDim { tensor: tensor(), dim: dim as u32, value: v }));
            }
            *slot = v;
        }
        let mut elements: u64 = ne[0] as u64;
        for &d in &ne[1..] {
            elements = match elements.checked_mul(d as u64) {
                Some(e) if e <= i64::MAX as u64 => e,
                _ => return Err(r.err_at(dims_at, ErrorKind::ShapeOverflow { tensor: tensor() })),
            };
        }
        let type_at = r.pos;
        let ty = r.u32("a tensor type")?;
        let Some((type_name, block, block_bytes)) = ggml_type(ty) else {
            return Err(r.err_at(type_at, ErrorKind::BadTensorType { tensor: tensor(), ggml_type: ty }));
        };
        if !(ne[0] as u64).is_multiple_of(block) {
            return Err(r.err_at(
                dims_at,
                ErrorKind::RowNotBlockMultiple { tensor: tensor(), ggml_type: type_name, row: ne[0], block },
            ));
        }
        let Some(nbytes) = (elements / block).checked_mul(block_bytes) else {
            return Err(r.err_at(type_at, ErrorKind::TensorTooLarge { tensor: tensor() }));
        };
        let offset_at = r.pos;
        let offset = r.u64("a tensor data offset")?;
        if offset % alignment != 0 {
            return Err(r.err_at(offset_at, ErrorKind::MisalignedOffset { tensor: tensor(), offset, alignment }));
        }
        if offset != expected {
            return Err(r.err_at(offset_at, ErrorKind::UnexpectedOffset { tensor: tensor(), offset, expected }));
        }
        let padded = nbytes
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| r.err_at(type_at, ErrorKind::TensorTooLarge { tensor: tensor() }))?;
        expected = expected
            .checked_add(padded)
            .ok_or_else(|| r.err_at(type_at, ErrorKind::TensorTooLarge { tensor: tensor() }))?;
    }

    // The data section starts at the next multiple of the alignment (when there are tensors).
    let data_offset = if n_tensors > 0 { r.pos.next_multiple_of(alignment) } else { r.pos };
    let data_end = data_offset.saturating_add(expected);
    if data_end > file_len {
        return Err(r.err_at(data_offset, ErrorKind::DataPastEnd { data_end, file_len }));
    }
    Ok(Summary { version, n_tensors, n_kv, architecture, name, alignment, data_offset, data_size: expected })
}

/// Keys llama.cpp reads with getters that abort on another type.
fn check_key_type(key: &[u8], found: &str, at: u64, r: &Reader<'_>) -> Result<(), GgufError> {
    let expected = match key {
        b"general.alignment" | b"general.file_type" => "u32",
        b"general.architecture" => "a string",
        _ => return Ok(()),
    };
    if found == expected {
        return Ok(());
    }
    let key: &'static str = match key {
        b"general.alignment" => "general.alignment",
        b"general.file_type" => "general.file_type",
        _ => "general.architecture",
    };
    Err(r.err_at(at, ErrorKind::WrongKeyType { key, expected, found: found.to_string() }))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A bounds-checked little-endian reader over the file's first bytes.
struct Reader<'a> {
    data: &'a [u8],
    pos: u64,
    file_len: u64,
}

impl<'a> Reader<'a> {
    fn err_at(&self, offset: u64, kind: ErrorKind) -> GgufError {
        GgufError { offset, kind }
    }

    /// The next `n` bytes, or why they are not there.
    fn bytes(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.ensure(n, what)?;
        let start = self.pos as usize;
        self.pos = end;
        Ok(&self.data[start..end as usize])
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), GgufError> {
        self.pos = self.ensure(n, what)?;
        Ok(())
    }

    /// The end of the next `n` bytes, checked against the file and then against the slice.
    fn ensure(&self, n: u64, what: &str) -> Result<u64, GgufError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.file_len => {
                if end > self.data.len() as u64 {
                    return Err(self.err_at(self.pos, ErrorKind::NeedMore { need: end }));
                }
                Ok(end)
            }
            _ => Err(self.err_at(self.pos, ErrorKind::Truncated { what: what.into(), file_len: self.file_len })),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    fn string(&mut self, what: &str) -> Result<&'a [u8], GgufError> {
        let len_at = self.pos;
        let len = self.u64(what)?;
        if len > MAX_STRING_LEN {
            return Err(self.err_at(len_at, ErrorKind::StringTooLong { len }));
        }
        self.bytes(len, what)
    }
}

/// Why [`check_file`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Invalid(#[from] GgufError),
    #[error("its header and metadata take more than {} MiB", MAX_METADATA_BYTES >> 20)]
    MetadataTooLarge,
}

/// Checks the GGUF file at `path`, reading only as much of its start as the header, metadata and
/// tensor table take (beginning with 1 MiB, growing as [`parse_prefix`] asks).
pub fn check_file(path: &Path) -> Result<Summary, CheckError> {
    let mut f = File::open(path)?;
    let file_len = f.metadata()?.len();
    let mut buf = Vec::new();
    let mut want = (1u64 << 20).min(file_len);
    loop {
        let have = buf.len() as u64;
        if want > have {
            f.seek(io::SeekFrom::Start(have))?;
            (&mut f).take(want - have).read_to_end(&mut buf)?;
        }
        match parse_prefix(&buf, file_len) {
            Err(GgufError { kind: ErrorKind::NeedMore { need }, .. }) => {
                if buf.len() as u64 >= file_len {
                    // The file shrank while being read.
                    return Err(
                        io::Error::new(io::ErrorKind::UnexpectedEof, "the file changed while being read").into()
                    );
                }
                let next = need.max(want.saturating_mul(4)).min(file_len);
                if next > MAX_METADATA_BYTES as u64 {
                    return Err(CheckError::MetadataTooLarge);
                }
                want = next;
            }
            other => return Ok(other?),
        }
    }
}

/// Writes GGUF files: for tests (malformed files are written by hand from valid ones) and tools.
#[derive(Clone, Debug, Default)]
pub struct Writer {
    version: u32,
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<u8>,
    n_tensors: u64,
    data_len: u64,
    alignment: u64,
}

impl Writer {
    pub fn new() -> Self {
        Writer { version: 3, alignment: DEFAULT_ALIGNMENT, ..Writer::default() }
    }

    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    fn key(&mut self, key: &str, ty: u32) {
        put_str(&mut self.kv, key.as_bytes());
        self.kv.extend_from_slice(&ty.to_le_bytes());
        self.n_kv += 1;
    }

    pub fn string(mut self, key: &str, value: &str) -> Self {
        self.key(key, value_type::STRING);
        put_str(&mut self.kv, value.as_bytes());
        self
    }

    pub fn u32(mut self, key: &str, value: u32) -> Self {
        self.key(key, value_type::U32);
        self.kv.extend_from_slice(&value.to_le_bytes());
        if key == "general.alignment" && value.is_power_of_two() {
            self.alignment = u64::from(value);
        }
        self
    }

    pub fn f32(mut self, key: &str, value: f32) -> Self {
        self.key(key, value_type::F32);
        self.kv.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn strings(mut self, key: &str, values: &[&str]) -> Self {
        self.key(key, value_type::ARRAY);
        self.kv.extend_from_slice(&value_type::STRING.to_le_bytes());
        self.kv.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for v in values {
            put_str(&mut self.kv, v.as_bytes());
        }
        self
    }

    /// A tensor of ggml type `ty` and shape `dims`, placed after the previous one.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32) -> Self {
        put_str(&mut self.tensors, name.as_bytes());
        self.tensors.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend_from_slice(&d.to_le_bytes());
        }
        self.tensors.extend_from_slice(&ty.to_le_bytes());
        self.tensors.extend_from_slice(&self.data_len.to_le_bytes());
        let (_, block, bytes) = ggml_type(ty).unwrap_or(("", 1, 1));
        let n = dims.iter().fold(1u64, |a, &d| a.saturating_mul(d));
        let size =
            (n / block).saturating_mul(bytes).saturating_add(self.alignment - 1) / self.alignment * self.alignment;
        self.data_len = self.data_len.saturating_add(size);
        self.n_tensors += 1;
        self
    }

    /// The file: header, metadata, tensor table, padding, and zeroed tensor data (left out when
    /// it would exceed 1 GiB: such a file is only good for testing refusals).
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.n_tensors.to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        out.extend_from_slice(&self.tensors);
        if self.n_tensors > 0 {
            out.resize((out.len() as u64).next_multiple_of(self.alignment) as usize, 0);
            if self.data_len <= 1 << 30 {
                out.resize(out.len() + self.data_len as usize, 0);
            }
        }
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

/// A well-formed GGUF that makes llama.cpp abort while loading it: a `llama` model with
/// `block_count = 0` trips `GGML_ASSERT(hparams.n_layer_all > 0 …)` in `load_hparams` (SIGABRT),
/// padded to 320 bytes with `general.name`. Every structural check passes.
pub fn aborting_model() -> Vec<u8> {
    let build = |name: &str| {
        Writer::new()
            .string("general.architecture", "llama")
            .string("general.name", name)
            .u32("llama.context_length", 64)
            .u32("llama.embedding_length", 64)
            .u32("llama.block_count", 0)
            .build()
    };
    let base = build("").len();
    build(&"x".repeat(320usize.saturating_sub(base)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid model: metadata of every kind, three tensors of different types.
    fn valid() -> Writer {
        Writer::new()
            .string("general.architecture", "llama")
            .string("general.name", "tiny")
            .u32("general.alignment", 32)
            .u32("llama.block_count", 1)
            .f32("llama.rope.freq_base", 10000.0)
            .strings("tokenizer.ggml.tokens", &["a", "b", "<s>"])
            .tensor("token_embd.weight", &[64, 3], 8)
            .tensor("output_norm.weight", &[64], 0)
            .tensor("blk.0.attn_q.weight", &[256, 2], 12)
    }

    fn kind(bytes: &[u8]) -> ErrorKind {
        match parse(bytes) {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(e) => e.kind,
        }
    }

    fn le64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Where the tensor table starts in `valid()`.
    fn table_start(bytes: &[u8]) -> usize {
        let needle = b"token_embd.weight";
        bytes.windows(needle.len()).position(|w| w == needle).unwrap() - 8
    }

    #[test]
    fn a_valid_file_is_summarised() {
        let bytes = valid().build();
        let s = parse(&bytes).unwrap();
        assert_eq!(s.version, 3);
        assert_eq!((s.n_tensors, s.n_kv), (3, 6));
        assert_eq!(s.architecture.as_deref(), Some("llama"));
        assert_eq!(s.name.as_deref(), Some("tiny"));
        assert_eq!(s.data_offset % 32, 0);
        // 64x3 q8_0 = 6 blocks of 34 bytes; 64 f32; 2 q4_K blocks; each padded to 32.
        assert_eq!(s.data_size, 204u64.next_multiple_of(32) + 256 + 288);
        assert_eq!(s.data_offset + s.data_size, bytes.len() as u64);
        // Version 2 is read too; an empty file with no tensors is structurally valid.
        assert!(parse(&valid().version(2).build()).is_ok());
        assert!(parse(&Writer::new().build()).is_ok());
    }

    #[test]
    fn malformed_files_are_refused_with_the_reason() {
        let good = valid().build();
        let t = table_start(&good);
        type Check = fn(&ErrorKind) -> bool;
        fn case(what: &str, bytes: Vec<u8>, check: Check) -> (&str, Vec<u8>, Check) {
            (what, bytes, check)
        }
        let cases = vec![
            case("empty", vec![], |k| matches!(k, ErrorKind::Truncated { .. })),
            case("truncated header", good[..10].to_vec(), |k| matches!(k, ErrorKind::Truncated { .. })),
            case(
                "bad magic",
                [b"GGML".as_slice(), &good[4..]].concat(),
                |k| matches!(k, ErrorKind::BadMagic(m) if m == b"GGML"),
            ),
            case("version 1", valid().version(1).build(), |k| matches!(k, ErrorKind::UnsupportedVersion(1))),
            case("version 4", valid().version(4).build(), |k| matches!(k, ErrorKind::UnsupportedVersion(4))),
            case("byte-swapped version", valid().version(3 << 24).build(), |k| {
                matches!(k, ErrorKind::UnsupportedVersion(_))
            }),
            case(
                "absurd tensor count",
                {
                    let mut b = good.clone();
                    le64(&mut b, 8, u64::MAX);
                    b
                },
                |k| matches!(k, ErrorKind::TooMany { what: "tensors", count: u64::MAX, .. }),
            ),
            case(
                "absurd kv count",
                {
                    let mut b = good.clone();
                    le64(&mut b, 16, 1 << 40);
                    b
                },
                |k| matches!(k, ErrorKind::TooMany { what: "metadata entries", .. }),
            ),
            case(
                "a string longer than the file",
                {
                    let mut b = good.clone();
                    le64(&mut b, 24, 1 << 20);
                    b
                },
                |k| matches!(k, ErrorKind::Truncated { .. }),
            ),
            case(
                "a string longer than llama.cpp allows",
                {
                    let mut b = good.clone();
                    le64(&mut b, 24, u64::MAX);
                    b
                },
                |k| matches!(k, ErrorKind::StringTooLong { len: u64::MAX }),
            ),
            case(
                "an array longer than the file",
                {
                    let mut b = good.clone();
                    let at = b.windows(21).position(|w| w == b"tokenizer.ggml.tokens").unwrap() + 21 + 8;
                    le64(&mut b, at, 1 << 29);
                    b
                },
                // Read on into the tensor table, whose bytes make no sense as strings.
                |k| matches!(k, ErrorKind::Truncated { .. } | ErrorKind::StringTooLong { .. }),
            ),
            case(
                "a tensor offset past the end",
                {
                    let mut b = good.clone();
                    let at = t + 8 + 17 + 4 + 16 + 4;
                    le64(&mut b, at, 1 << 40);
                    b
                },
                |k| matches!(k, ErrorKind::UnexpectedOffset { offset, .. } if *offset == 1 << 40),
            ),
            case(
                "misaligned tensor data",
                {
                    let mut b = good.clone();
                    let at = t + 8 + 17 + 4 + 16 + 4;
                    le64(&mut b, at, 3);
                    b
                },
                |k| matches!(k, ErrorKind::MisalignedOffset { offset: 3, alignment: 32, .. }),
            ),
            case("tensor data cut off", good[..good.len() - 100].to_vec(), |k| {
                matches!(k, ErrorKind::DataPastEnd { .. })
            }),
            case(
                "unknown tensor type",
                {
                    let mut b = good.clone();
                    let at = t + 8 + 17 + 4 + 16;
                    b[at..at + 4].copy_from_slice(&4u32.to_le_bytes());
                    b
                },
                |k| matches!(k, ErrorKind::BadTensorType { ggml_type: 4, .. }),
            ),
            case(
                "too many dimensions",
                {
                    let mut b = good.clone();
                    let at = t + 8 + 17;
                    b[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
                    b
                },
                |k| matches!(k, ErrorKind::TooManyDims { n_dims: 9, .. }),
            ),
            case(
                "a negative dimension",
                {
                    let mut b = good.clone();
                    le64(&mut b, t + 8 + 17 + 4, u64::MAX);
                    b
                },
                |k| matches!(k, ErrorKind::NegativeDim { value: -1, .. }),
            ),
            case("shape overflow", Writer::new().tensor("t", &[1 << 40, 1 << 40], 0).build(), |k| {
                matches!(k, ErrorKind::ShapeOverflow { .. })
            }),
            case("row not a multiple of the block", Writer::new().tensor("t", &[33], 8).build(), |k| {
                matches!(k, ErrorKind::RowNotBlockMultiple { row: 33, block: 32, .. })
            }),
            case(
                "duplicate tensor",
                Writer::new().tensor("t", &[4], 0).tensor("t", &[4], 0).build(),
                |k| matches!(k, ErrorKind::DuplicateTensor(n) if n == "t"),
            ),
            case("tensor name too long", Writer::new().tensor(&"n".repeat(64), &[4], 0).build(), |k| {
                matches!(k, ErrorKind::TensorNameTooLong { len: 64, .. })
            }),
            case(
                "duplicate key",
                Writer::new().u32("a", 1).u32("a", 2).build(),
                |k| matches!(k, ErrorKind::DuplicateKey(n) if n == "a"),
            ),
            case("empty key", Writer::new().u32("", 1).build(), |k| matches!(k, ErrorKind::EmptyKey { index: 0 })),
            case("alignment not a power of two", Writer::new().u32("general.alignment", 48).build(), |k| {
                matches!(k, ErrorKind::BadAlignment(48))
            }),
            case("alignment of the wrong type", Writer::new().f32("general.alignment", 32.0).build(), |k| {
                matches!(k, ErrorKind::WrongKeyType { key: "general.alignment", .. })
            }),
            case("architecture of the wrong type", Writer::new().u32("general.architecture", 7).build(), |k| {
                matches!(k, ErrorKind::WrongKeyType { key: "general.architecture", .. })
            }),
            case(
                "unknown value type",
                {
                    let mut b = Writer::new().u32("k", 1).build();
                    let at = 24 + 8 + 1;
                    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
                    b
                },
                |k| matches!(k, ErrorKind::BadValueType { value_type: 99, .. }),
            ),
            case(
                "array of arrays",
                {
                    let mut b = Writer::new().strings("k", &[]).build();
                    let at = 24 + 8 + 1 + 4;
                    b[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
                    b
                },
                |k| matches!(k, ErrorKind::NestedArray { .. }),
            ),
        ];
        for (what, bytes, ok) in cases {
            let k = kind(&bytes);
            assert!(ok(&k), "{what}: got {k:?}");
            // Every reason reads as a sentence naming what is wrong.
            let msg = parse(&bytes).unwrap_err().to_string();
            assert!(msg.contains("at byte"), "{what}: {msg}");
        }
    }

    #[test]
    fn the_aborting_model_is_well_formed_and_320_bytes() {
        let bytes = aborting_model();
        assert_eq!(bytes.len(), 320);
        let s = parse(&bytes).unwrap();
        assert_eq!(s.architecture.as_deref(), Some("llama"));
    }

    #[test]
    fn every_prefix_and_every_single_byte_change_is_handled() {
        // No panic, no over-read, for every truncation and for every byte set to 0xFF: a cheap
        // stand-in for the fuzz target.
        let good = valid().build();
        for n in 0..good.len() {
            assert!(parse(&good[..n]).is_err(), "prefix of {n} bytes accepted");
            let _ = parse_prefix(&good[..n], good.len() as u64);
        }
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] = 0xFF;
            let _ = parse(&b);
        }
    }

    #[test]
    fn prefixes_ask_for_more() {
        let good = valid().build();
        let err = parse_prefix(&good[..40], good.len() as u64).unwrap_err();
        let ErrorKind::NeedMore { need } = err.kind else { panic!("{err:?}") };
        assert!(need > 40);
        assert!(parse_prefix(&good, good.len() as u64).is_ok());
    }

    #[test]
    fn check_file_reads_only_the_start() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("m.gguf");
        // 8 MiB of tensor data behind a small header: passes, reading 1 MiB.
        let bytes = Writer::new().tensor("big", &[2 << 20], 0).build();
        std::fs::write(&p, &bytes).unwrap();
        let s = check_file(&p).unwrap();
        assert_eq!(s.data_size, 8 << 20);
        // Metadata bigger than the first read: the reader grows.
        let many: Vec<String> = (0..200_000).map(|i| format!("token{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        std::fs::write(&p, Writer::new().strings("tokenizer.ggml.tokens", &refs).build()).unwrap();
        assert_eq!(check_file(&p).unwrap().n_kv, 1);
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            check_file(&p),
            Err(CheckError::Invalid(GgufError { kind: ErrorKind::DataPastEnd { .. }, .. }))
        ));
    }
}
