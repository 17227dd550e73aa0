//! Decompression of compressed clusters (spec "Compressed Clusters Descriptor", header
//! `compression_type`): raw deflate (QEMU's zlib type, window bits -12) and zstd frames, both in
//! pure Rust. A stream is good when it fills the whole cluster; what follows it (padding up to the
//! sector) is ignored, as QEMU does.

use std::io::Read;

use miniz_oxide::inflate::core::{decompress as inflate, inflate_flags, DecompressorOxide};

use super::header::Compression;

/// Decompresses `input` into `out` (one cluster); false when the stream is bad or too short.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> bool {
    match kind {
        Compression::Zlib => {
            let mut st = DecompressorOxide::new();
            let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
            let (_, _, written) = inflate(&mut st, input, out, 0, flags);
            written == out.len()
        }
        Compression::Zstd => {
            let Ok(mut dec) = ruzstd::decoding::StreamingDecoder::new(input) else {
                return false;
            };
            dec.read_exact(out).is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_stream_fills_cluster_and_garbage_fails() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let c = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut padded = c.clone();
        padded.extend_from_slice(&[0xaa; 100]);
        let mut out = vec![0u8; 4096];
        assert!(decompress(Compression::Zlib, &padded, &mut out));
        assert_eq!(out, data);
        let mut big = vec![0u8; 8192];
        assert!(!decompress(Compression::Zlib, &c, &mut big));
        assert!(!decompress(Compression::Zstd, &[1, 2, 3, 4], &mut out));
    }
}
