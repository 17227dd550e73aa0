//! Compression and decompression of compressed clusters (spec "Compressed Clusters Descriptor",
//! header `compression_type`): raw deflate (QEMU's zlib type, window bits -12) and zstd frames,
//! both in pure Rust. A stream is good when it fills the whole cluster; what follows it (padding
//! up to the sector) is ignored, as QEMU does.
//!
//! QEMU inflates with a 4 KiB window, so a deflate stream must never reach further back than
//! 4 KiB. The compressor here has a fixed 32 KiB window; a full flush after every 4 KiB of input
//! empties its dictionary, so no match crosses a 4 KiB boundary (each flush costs 5 bytes).

use std::io::Read;
use std::sync::{Mutex, PoisonError};

use miniz_oxide::deflate::core::{
    compress as deflate, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
    TDEFLStatus,
};
use miniz_oxide::inflate::core::{decompress as inflate, inflate_flags, DecompressorOxide};

use super::header::Compression;
use crate::buffers::DIRECT_ALIGN;

/// How many decompression buffers an image keeps between reads besides those holding its last
/// decompressed clusters (`decompressed.rs`): the stream and the cluster of a read, and the
/// stream of a second at the same time. A burst of concurrent reads of compressed clusters borrows more, and frees them as
/// it ends.
pub const COMPRESSED_KEEP: usize = 3;

/// The size of every decompression buffer of an image with `cluster_size`-byte clusters: room
/// for the aligned blocks around a compressed stream (at most two clusters long, spec
/// "Compressed Clusters Descriptor"), and so for the decompressed cluster too. One size serves
/// both, so that any kept buffer serves either.
pub fn compressed_scratch_len(cluster_size: usize) -> usize {
    2 * cluster_size + 2 * DIRECT_ALIGN
}

/// Deflate decoders' states (11 KiB each), kept between decompressions for every image: a state
/// built in a worker's frame would leave those pages of its stack resident for the worker's life,
/// in every worker that ever decompressed (a stack never shrinks), where a kept state is heap
/// reused by the next worker. `init` readies a kept one in place.
static INFLATERS: Mutex<Vec<Box<DecompressorOxide>>> = Mutex::new(Vec::new());

/// How many deflate decoders' states are kept: one per decompression that may run at once in
/// the usual case; a burst of more builds extra ones and drops them.
const INFLATERS_KEEP: usize = 4;

/// A new deflate decoder's state on the heap. Never inlined: it is built in this frame and moved,
/// so only the stacks of the threads that build one (at most `INFLATERS_KEEP` in the steady state)
/// ever held one.
#[inline(never)]
fn new_inflater() -> Box<DecompressorOxide> {
    Box::default()
}

/// Decompresses `input` into `out` (one cluster); false when the stream is bad or too short.
/// Never inlined: zstd's decoder is large too, and should sit on the stack only while a cluster
/// is decompressed, not in the frame of every read through a chain (a read of an overlay calls
/// the same read again for its backing file, which would then hold that much stack twice).
#[inline(never)]
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> bool {
    match kind {
        Compression::Zlib => {
            // Only pushes and pops run under the lock: none panics.
            let kept = || INFLATERS.lock().unwrap_or_else(PoisonError::into_inner);
            let mut st = kept().pop().unwrap_or_else(new_inflater);
            st.init();
            let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
            let (_, _, written) = inflate(&mut st, input, out, 0, flags);
            let mut kept = kept();
            if kept.len() < INFLATERS_KEEP {
                kept.push(st);
            }
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

/// QEMU's deflate window (window bits -12).
const WINDOW: usize = 4096;

/// QEMU's deflate level (zlib's default).
const LEVEL: i32 = 6;

/// Compresses one cluster; `None` when the stream would not be shorter than `limit` bytes (the
/// cluster is then stored as it is, as QEMU stores it).
pub fn compress(kind: Compression, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    let out = match kind {
        Compression::Zlib => deflate_limited(input, limit)?,
        Compression::Zstd => {
            ruzstd::encoding::compress_to_vec(input, ruzstd::encoding::CompressionLevel::Fastest)
        }
    };
    (out.len() < limit).then_some(out)
}

/// Raw deflate of `input` whose matches stay within [`WINDOW`] bytes; `None` past `limit`.
fn deflate_limited(input: &[u8], limit: usize) -> Option<Vec<u8>> {
    // Negative window bits: a raw stream, without zlib's header and trailer.
    let mut d = CompressorOxide::new(create_comp_flags_from_zip_params(LEVEL, -12, 0));
    let mut out = vec![0u8; limit];
    let mut pos = 0;
    let mut chunks = input.chunks(WINDOW).peekable();
    while let Some(chunk) = chunks.next() {
        let flush = if chunks.peek().is_some() {
            TDEFLFlush::Full
        } else {
            TDEFLFlush::Finish
        };
        let (status, read, written) = deflate(&mut d, chunk, &mut out[pos..], flush);
        pos += written;
        let done = match flush {
            TDEFLFlush::Finish => status == TDEFLStatus::Done,
            _ => status == TDEFLStatus::Okay,
        };
        // A stream that filled the buffer before taking all its input does not fit.
        if !done || read < chunk.len() || pos >= limit {
            return None;
        }
    }
    out.truncate(pos);
    Some(out)
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

    /// Inflates `stream` through a 4 KiB circular history, all QEMU's window bits -12 keep: a
    /// match reaching further back reads the wrong bytes.
    fn inflate_4k(stream: &[u8], len: usize) -> Vec<u8> {
        let mut st = DecompressorOxide::new();
        let mut ring = vec![0u8; WINDOW];
        let mut out = Vec::new();
        let mut input = stream;
        let mut pos = 0;
        while out.len() < len {
            let (status, read, written) = inflate(&mut st, input, &mut ring, pos, 0);
            out.extend_from_slice(&ring[pos..pos + written]);
            pos = (pos + written) % WINDOW;
            input = &input[read..];
            if (status as i32) <= 0 {
                break;
            }
        }
        out
    }

    #[test]
    fn deflate_round_trips_and_keeps_to_4k_windows() {
        // Repeats at 5 KiB: a 32 KiB window would match them, a 4 KiB one must not.
        let block: Vec<u8> = (0..5120u32)
            .map(|i| (i * 7 % 253).to_le_bytes()[0])
            .collect();
        let data: Vec<u8> = block.iter().cycle().take(65536).copied().collect();
        let c = compress(Compression::Zlib, &data, 65536).expect("compresses");
        let mut out = vec![0u8; 65536];
        assert!(decompress(Compression::Zlib, &c, &mut out));
        assert_eq!(out, data);
        assert!(inflate_4k(&c, data.len()) == data, "a match beyond 4 KiB");
        let z = compress(Compression::Zstd, &data, 65536).expect("compresses");
        assert!(decompress(Compression::Zstd, &z, &mut out));
        assert_eq!(out, data);
        // Noise does not compress below a cluster.
        let mut rng = 0x1234_5678u32;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 17;
                rng ^= rng << 5;
                rng.to_le_bytes()[0]
            })
            .collect();
        assert_eq!(compress(Compression::Zlib, &noise, 65536), None);
        assert_eq!(compress(Compression::Zstd, &noise, 65536), None);
    }
}
