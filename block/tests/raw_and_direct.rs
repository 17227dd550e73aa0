//! Raw images and `cache=none` (O_DIRECT): unaligned reads and writes through both formats,
//! discards and write-zeroes, compared with what the host file or qemu-img reads.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // Test data: byte patterns.

mod common;
use block::{open, CacheMode, DiskImage, Format, OpenOptions};
use common::*;

fn opts(format: Format, cache: CacheMode) -> OpenOptions {
    OpenOptions {
        format: Some(format),
        read_only: false,
        cache,
        ..Default::default()
    }
}

#[test]
fn raw_images_in_both_cache_modes() {
    let dir = tempfile::tempdir().unwrap();
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let p = tmp(&dir, "r.raw");
        std::fs::write(&p, vec![0x11u8; 3 << 20]).unwrap();
        let mut mirror = vec![0x11u8; 3 << 20];
        {
            let img = open(&p, opts(Format::Raw, cache)).unwrap();
            assert_eq!(img.size(), 3 << 20);
            let data: Vec<u8> = (0..100_001u32).map(|i| i as u8).collect();
            img.write_at(&data, 12_345).unwrap();
            mirror[12_345..12_345 + data.len()].copy_from_slice(&data);
            img.write_zeroes(1 << 20, 70_000, true).unwrap();
            mirror[1 << 20..(1 << 20) + 70_000].fill(0);
            img.discard(2 << 20, 4096).unwrap();
            mirror[2 << 20..(2 << 20) + 4096].fill(0);
            let mut b = vec![0u8; 333];
            img.read_at(&mut b, 12_300).unwrap();
            assert_eq!(b, mirror[12_300..12_633]);
            img.flush().unwrap();
        }
        assert_eq!(std::fs::read(&p).unwrap(), mirror, "{cache:?}");
    }
}

#[test]
fn qcow2_with_cache_none() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "d.qcow2");
    create_qcow2(&["-o", "cluster_size=4096", p.to_str().unwrap(), "8M"]);
    let mut mirror = vec![0u8; 8 << 20];
    {
        let img = open(&p, opts(Format::Qcow2, CacheMode::None)).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        for i in 0..200u32 {
            let off = rng.usize(0..(8 << 20) - 20_000);
            let len = rng.usize(1..20_000);
            let data = vec![(i % 250) as u8 + 1; len];
            img.write_at(&data, off as u64).unwrap();
            mirror[off..off + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
        let mut all = vec![0u8; 8 << 20];
        img.read_at(&mut all, 0).unwrap();
        assert_eq!(all, mirror);
    }
    assert_check_clean(&p);
    assert_eq!(read_qemu(&p, "qcow2"), mirror);
}
