//! Re-encoding a GGUF's weights into a format llama.cpp can batch on this CPU.
//!
//! llama.cpp's CPU backend multiplies most weight formats one activation column at a time
//! (`vec_dot`): decoding 4 sequences together then costs about 4 single decodes, so continuous
//! batching buys little. For a few formats it has kernels that load a block of weights once and
//! use it for several columns: Q4_0 (and IQ4_NL) are repacked at load into interleaved 8×8
//! blocks with AVX2 GEMM kernels, and Q8_0 goes through llamafile's tiled `tinyBLAS`. A model
//! stored in another format (Q4_1, as the default SmolLM2 is) can be written once in one of those
//! formats and served from the copy. This module writes that copy with llama.cpp's own quantizer
//! (`llama_model_quantize`); [`crate::engine`] loads it instead of the original.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

/// A weight format the engine can serve a model in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    Q4_0,
    Q8_0,
    Iq4Nl,
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 3] = [WeightFormat::Q4_0, WeightFormat::Q8_0, WeightFormat::Iq4Nl];

    pub fn as_str(self) -> &'static str {
        match self {
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Iq4Nl => "iq4_nl",
        }
    }

    pub fn parse(s: &str) -> Option<WeightFormat> {
        WeightFormat::ALL.into_iter().find(|f| f.as_str().eq_ignore_ascii_case(s))
    }

    fn ftype(self) -> llama_cpp_sys_2::llama_ftype {
        match self {
            WeightFormat::Q4_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_0,
            WeightFormat::Q8_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q8_0,
            WeightFormat::Iq4Nl => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_IQ4_NL,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("{path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("llama.cpp could not re-encode {src} as {format} (code {code})")]
    Quantize { src: PathBuf, format: WeightFormat, code: u32 },
}

/// `general.file_type` of a GGUF file (llama.cpp's `llama_ftype`: 2 = Q4_0, 3 = Q4_1, …), read
/// from its header only.
pub fn file_type(path: &Path) -> Option<u32> {
    let g = llama_cpp_2::gguf::GgufContext::from_file(path)?;
    let k = g.find_key("general.file_type");
    (k >= 0).then(|| g.val_u32(k))
}

/// A readable name for a `general.file_type`.
pub fn file_type_name(ft: u32) -> String {
    let name = match ft {
        0 => "f32",
        1 => "f16",
        2 => "q4_0",
        3 => "q4_1",
        7 => "q8_0",
        8 => "q5_0",
        9 => "q5_1",
        10 => "q2_k",
        11..=13 => "q3_k",
        14 | 15 => "q4_k",
        16 | 17 => "q5_k",
        18 => "q6_k",
        25 => "iq4_nl",
        32 => "bf16",
        _ => return format!("type {ft}"),
    };
    name.to_string()
}

/// For `Weights::Auto`: the format to serve a file stored as `file_type` in, when its own format
/// has no batched kernel on this CPU and another holds the same weights without loss. Q4_1 → Q8_0:
/// every Q4_1 weight (`d * q + m`, q in 0..15) is re-encoded to within 1/254 of its block's
/// largest magnitude; measured on SmolLM2-135M, perplexity 35.70 → 35.73, top-1 agreement 95%,
/// while one task ran 79 → 111 tok/s (see docs/benchmarks.md).
pub fn batched_format_for(file_type: u32) -> Option<WeightFormat> {
    if !has_tiled_q8_0() {
        return None;
    }
    match file_type {
        3 => Some(WeightFormat::Q8_0),
        _ => None,
    }
}

/// llamafile's tiled Q8_0 kernels (`tinyBLAS`) need AVX2 on x86.
fn has_tiled_q8_0() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The file to load for `src` under `weights`, and a description of the format served.
pub fn resolve(
    src: &Path,
    weights: crate::engine::Weights,
    copies_dir: Option<&Path>,
    threads: usize,
) -> Result<(PathBuf, String), TranscodeError> {
    use crate::engine::Weights;
    let ft = file_type(src);
    let stored = ft.map(file_type_name).unwrap_or_else(|| "unknown format".into());
    let target = match weights {
        Weights::Original => None,
        Weights::Auto => ft.and_then(batched_format_for),
        Weights::Format(f) => Some(f),
    };
    match target {
        None => Ok((src.to_path_buf(), stored)),
        Some(f) if ft == Some(f.ftype()) => Ok((src.to_path_buf(), stored)),
        Some(f) => {
            let started = std::time::Instant::now();
            let copy = ensure_copy(src, f, copies_dir, threads)?;
            tracing::info!(
                from = %src.display(), to = %copy.display(), secs = started.elapsed().as_secs_f32(),
                "serving {stored} weights as {f}"
            );
            Ok((copy, format!("{f}, re-encoded from {stored}")))
        }
    }
}

/// Where the copy of `src` in `format` is kept: in `dir` (else beside `src`), named after the
/// file, a hash of its full path (two files of one name do not share a copy) and the format.
pub fn copy_path(src: &Path, format: WeightFormat, dir: Option<&Path>) -> PathBuf {
    use sha2::Digest;
    let stem = src.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let full = std::fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf());
    let hash = sha2::Sha256::digest(full.as_os_str().as_encoded_bytes());
    let tag = crate::models::hex(&hash[..4]);
    let dir = dir.map(Path::to_path_buf).or_else(|| src.parent().map(Path::to_path_buf)).unwrap_or_default();
    dir.join(format!("{stem}.{tag}.koubou-{format}.gguf"))
}

/// Returns the copy of `src` in `format`, writing it first if it is missing or older than `src`.
/// The copy is written to a temporary name and renamed into place, so a crash never leaves a
/// half-written file where the engine looks.
pub fn ensure_copy(
    src: &Path,
    format: WeightFormat,
    dir: Option<&Path>,
    threads: usize,
) -> Result<PathBuf, TranscodeError> {
    let dst = copy_path(src, format, dir);
    let io = |path: &Path, e: std::io::Error| TranscodeError::Io { path: path.to_path_buf(), detail: e.to_string() };
    let src_meta = std::fs::metadata(src).map_err(|e| io(src, e))?;
    if let Ok(dst_meta) = std::fs::metadata(&dst)
        && let (Ok(s), Ok(d)) = (src_meta.modified(), dst_meta.modified())
        && d >= s
    {
        return Ok(dst);
    }
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    let tmp = dst.with_extension(format!("tmp-{}", std::process::id()));
    let result = quantize(src, &tmp, format, threads);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &dst).map_err(|e| io(&dst, e))?;
    Ok(dst)
}

fn quantize(src: &Path, dst: &Path, format: WeightFormat, threads: usize) -> Result<(), TranscodeError> {
    let c_path = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| TranscodeError::Io { path: p.to_path_buf(), detail: "the path contains a NUL byte".into() })
    };
    let (c_src, c_dst) = (c_path(src)?, c_path(dst)?);
    if !std::env::var("LOG_LEVEL").is_ok_and(|v| v.eq_ignore_ascii_case("debug")) {
        unsafe extern "C" fn quiet(
            _: llama_cpp_sys_2::ggml_log_level,
            _: *const std::ffi::c_char,
            _: *mut std::ffi::c_void,
        ) {
        }
        // SAFETY: a callback that ignores its arguments; llama.cpp keeps the pointer for the
        // process's lifetime, and a `fn` item lives that long.
        unsafe { llama_cpp_sys_2::llama_log_set(Some(quiet), std::ptr::null_mut()) };
    }
    // SAFETY: default params come from llama.cpp itself; the paths are valid NUL-terminated
    // strings that outlive the call; the pointer fields stay null (no imatrix, no overrides).
    let code = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.nthread = i32::try_from(threads.max(1)).unwrap_or(1);
        params.ftype = format.ftype();
        params.allow_requantize = true;
        // The token embedding (the output projection too, when tied) becomes Q8_0 rather than
        // llama.cpp's default Q6_K: Q8_0 is batched by tinyBLAS, and is where the model's
        // largest single matrix multiplication (vocabulary × hidden) happens.
        params.token_embedding_type = llama_cpp_sys_2::GGML_TYPE_Q8_0;
        params.output_tensor_type = llama_cpp_sys_2::GGML_TYPE_Q8_0;
        llama_cpp_sys_2::llama_model_quantize(c_src.as_ptr(), c_dst.as_ptr(), &params)
    };
    if code == 0 { Ok(()) } else { Err(TranscodeError::Quantize { src: src.to_path_buf(), format, code }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_name_themselves() {
        for f in WeightFormat::ALL {
            assert_eq!(WeightFormat::parse(f.as_str()), Some(f));
            assert_eq!(WeightFormat::parse(&f.as_str().to_uppercase()), Some(f));
        }
        assert_eq!(WeightFormat::parse("q4_1"), None);
        assert_eq!(file_type_name(3), "q4_1");
        assert_eq!(file_type_name(999), "type 999");
    }

    #[test]
    fn copies_of_same_named_files_do_not_collide() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a/m.gguf"), t.path().join("b/m.gguf"));
        let store = t.path().join("copies");
        let (ca, cb) =
            (copy_path(&a, WeightFormat::Q4_0, Some(&store)), copy_path(&b, WeightFormat::Q4_0, Some(&store)));
        assert_ne!(ca, cb);
        assert!(ca.starts_with(&store) && ca.to_string_lossy().ends_with(".koubou-q4_0.gguf"), "{}", ca.display());
        assert_eq!(copy_path(&a, WeightFormat::Q4_0, None).parent(), a.parent());
    }

    #[test]
    fn a_file_that_is_not_gguf_fails_without_leaving_a_copy() {
        let t = tempfile::tempdir().unwrap();
        let junk = t.path().join("junk.gguf");
        std::fs::write(&junk, b"not a model").unwrap();
        assert_eq!(file_type(&junk), None);
        let err = ensure_copy(&junk, WeightFormat::Q4_0, None, 1).unwrap_err();
        assert!(matches!(err, TranscodeError::Quantize { .. }), "{err}");
        let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("junk.gguf")]);
    }
}
