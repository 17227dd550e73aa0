//! Writing compressed clusters (spec "Compressed Clusters Descriptor"), for `vmm-img convert
//! -c`: a cluster that compresses below its size is stored as a stream packed right after the
//! previous one, in the same host cluster when it fits there (as QEMU packs them), else at the
//! start of a new one; each stream adds one reference to the host cluster holding it. Other
//! clusters are written as they are.
//!
//! Only clusters that are not allocated yet are written compressed (a new image's), as QEMU
//! requires. The stream is written before its L2 entry is published, with the ordering every
//! new data cluster has (`Meta::publish_data`).

use super::compress;
use super::l2::{Mapping, COMPRESSED};
use super::Qcow2;
use crate::{DiskImage, Error};

/// Bytes per sector, the unit of a descriptor's length (spec).
const SECTOR: u64 = 512;

/// Where the next stream goes.
#[derive(Debug, Default)]
pub struct CompressedWriter {
    /// Host offset just past the last stream written (0: none yet).
    tail: u64,
}

impl CompressedWriter {
    /// A writer that starts a new host cluster for its first stream.
    pub fn new() -> CompressedWriter {
        CompressedWriter::default()
    }

    /// Writes the cluster at `guest` (cluster aligned; `data` one cluster, zero padded past
    /// the end of the disk) compressed when that makes it smaller, else as it is; returns
    /// whether it was compressed.
    pub fn write(&mut self, img: &Qcow2, guest: u64, data: &[u8]) -> Result<bool, Error> {
        let cs = img.geo.cluster_size();
        let within = cs.min(img.size().saturating_sub(guest));
        // At least one byte: a cluster at the end of the disk is out of range.
        img.check_request(guest, within.max(1), true)?;
        let limit = usize::try_from(cs).unwrap_or(usize::MAX);
        if !guest.is_multiple_of(cs) || data.len() != limit {
            return Err(Error::CompressedWrite {
                path: img.file.path().to_string(),
                offset: guest,
                why: "it is not one whole cluster",
            });
        }
        let Some(stream) = compress::compress(img.compression, data, limit) else {
            let n = usize::try_from(within).unwrap_or(0);
            img.write_at(&data[..n], guest)?;
            return Ok(false);
        };
        let mut m = img.lock_with_room()?;
        let l2 = img.writable_l2(&mut m, guest)?;
        let (entry, bitmap) = m.l2_words(l2, guest);
        if !matches!(
            img.decode(entry, bitmap, guest)?.0,
            Mapping::Unallocated | Mapping::Zero { host: None }
        ) {
            return Err(Error::CompressedWrite {
                path: img.file.path().to_string(),
                offset: guest,
                why: "the cluster is allocated already",
            });
        }
        let len = stream.len() as u64;
        let f = &img.file;
        let packed = !self.tail.is_multiple_of(cs) && self.tail % cs + len <= cs;
        let host = if packed && m.refcount(f, self.tail / cs)? > 0 {
            m.incref(f, self.tail / cs)?;
            // The raised refcount must be durable before the entry that needs it.
            m.owed.l2_after_refcounts = m.stamp();
            self.tail
        } else {
            m.alloc_cluster(f)?
        };
        let end = host + len;
        // Zeroes to the end of the last sector, which the descriptor covers (the next stream
        // may overwrite them).
        let mut bytes = stream;
        bytes.resize(
            usize::try_from(end.next_multiple_of(SECTOR) - host).unwrap_or(0),
            0,
        );
        img.check_data_write(host, bytes.len() as u64)?;
        f.write_at(&bytes, host)?;
        // Spec: x = 62 - (cluster_bits - 8); bits 0..x-1 the offset, x..61 the sectors after
        // the first.
        let x = 62 - (img.geo.cluster_bits - 8);
        let sectors = (end - 1) / SECTOR - host / SECTOR;
        m.publish_data(l2, guest, COMPRESSED | (sectors << x) | host, 0);
        self.tail = end;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::decompressed::KEPT;
    use super::super::tests::{assert_consistent, create, open_rw, qcow2};
    use super::super::COMPRESSED_KEEP;
    use super::*;

    #[test]
    fn streams_pack_into_one_host_cluster_and_allocated_clusters_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.qcow2");
        create(&p, "cluster_size=65536", "1M");
        let img = open_rw(&p);
        let q = qcow2(&img);
        let mut w = CompressedWriter::new();
        let cluster = |b: u8| vec![b; 65536];
        assert!(w.write(q, 0, &cluster(1)).unwrap());
        assert!(w.write(q, 65536, &cluster(2)).unwrap());
        let host = |g| match q.lookup(g).unwrap().0 {
            Mapping::Compressed { host, .. } => host,
            m => panic!("{m:?}"),
        };
        assert_eq!(host(0) / 65536, host(65536) / 65536, "not packed");
        assert!(matches!(
            w.write(q, 0, &cluster(3)),
            Err(Error::CompressedWrite { offset: 0, .. })
        ));
        assert!(matches!(
            w.write(q, 512, &cluster(3)),
            Err(Error::CompressedWrite { offset: 512, .. })
        ));
        assert!(matches!(
            w.write(q, 1 << 20, &cluster(3)),
            Err(Error::OutOfRange { .. })
        ));
        img.flush().unwrap();
        let mut back = vec![0u8; 65536];
        img.read_at(&mut back, 65536).unwrap();
        assert_eq!(back, cluster(2));
        drop(img);
        // The shared host cluster counts both streams.
        assert_consistent(&p, false);
    }

    #[test]
    fn concurrent_reads_of_compressed_clusters_keep_few_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.qcow2");
        create(&p, "cluster_size=65536", "1M");
        let img = open_rw(&p);
        let q = qcow2(&img);
        let mut w = CompressedWriter::new();
        let cluster = |i: u8| {
            (0..65536u32)
                .map(|j| (j / 300).to_le_bytes()[0] ^ i)
                .collect::<Vec<u8>>()
        };
        for i in 0..16u8 {
            assert!(w.write(q, u64::from(i) * 65536, &cluster(i)).unwrap());
        }
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (img, barrier) = (&img, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    // Each thread reads every cluster in 4 KiB pieces, starting at its own.
                    for k in 0..16u64 {
                        let c = (t + k) % 16;
                        let mut back = vec![0u8; 4096];
                        let at = c * 65536 + (t * 4096 + 512) % 61440;
                        img.read_at(&mut back, at).unwrap();
                        let from = usize::try_from(at % 65536).unwrap();
                        let want = cluster(u8::try_from(c).unwrap());
                        assert_eq!(back, want[from..from + 4096], "cluster {c}");
                    }
                });
            }
        });
        assert!(q.compressed_bufs.kept_count() <= COMPRESSED_KEEP);
        // One reader after the burst reuses what was kept: nothing more is kept.
        let kept = q.compressed_bufs.kept_count();
        let mut back = vec![0u8; 65536];
        img.read_at(&mut back, 65536).unwrap();
        assert_eq!(back, cluster(1));
        assert_eq!(q.compressed_bufs.kept_count(), kept);
    }

    /// Writes `n` compressed clusters of distinct bytes to a new image at `p`, and returns them
    /// with their streams' host offsets.
    fn compressed_clusters(p: &std::path::Path, n: u8) -> (Vec<Vec<u8>>, Vec<u64>) {
        create(p, "cluster_size=65536", "1M");
        let img = open_rw(p);
        let q = qcow2(&img);
        let mut w = CompressedWriter::new();
        let clusters: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                (0..65536u32)
                    .map(|j| (j / 300).to_le_bytes()[0] ^ i)
                    .collect()
            })
            .collect();
        let mut hosts = Vec::new();
        for (i, c) in clusters.iter().enumerate() {
            let guest = i as u64 * 65536;
            assert!(w.write(q, guest, c).unwrap());
            hosts.push(stream_at(q, guest));
        }
        img.flush().unwrap();
        (clusters, hosts)
    }

    /// The host offset of the stream of the compressed cluster at `guest`.
    fn stream_at(q: &Qcow2, guest: u64) -> u64 {
        match q.lookup(guest).unwrap().0 {
            Mapping::Compressed { host, .. } => host,
            m => panic!("{m:?}"),
        }
    }

    /// Spoils the start of the stream at `host`, behind the open image's back.
    fn spoil(p: &std::path::Path, host: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(&[0xff; 16], host).unwrap();
        f.sync_all().unwrap();
    }

    #[test]
    fn an_image_decompresses_a_cluster_once_while_it_is_among_the_last_kept() {
        let kept = u8::try_from(KEPT).unwrap();
        for read_only in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("c.qcow2");
            let (clusters, hosts) = compressed_clusters(&p, kept + 1);
            let options = crate::OpenOptions {
                format: Some(crate::Format::Qcow2),
                read_only,
                ..Default::default()
            };
            let img = crate::open(&p, options).unwrap();
            let mut page = vec![0u8; 4096];
            img.read_at(&mut page, 0).unwrap();
            assert_eq!(page, clusters[0][..4096]);
            // The next pages of cluster 0 come from its decompressed copy: its stream is not
            // read, even between reads of as many other clusters as are kept less one.
            spoil(&p, hosts[0]);
            for at in [4096usize, 61440] {
                for c in 1..kept {
                    img.read_at(&mut page, u64::from(c) * 65536 + 512).unwrap();
                    assert_eq!(page, clusters[usize::from(c)][512..4608]);
                }
                img.read_at(&mut page, at as u64).unwrap();
                assert_eq!(page, clusters[0][at..at + 4096]);
            }
            // Reads of `kept` other clusters push cluster 0 out: its spoilt stream is read again.
            for c in 1..=kept {
                img.read_at(&mut page, u64::from(c) * 65536).unwrap();
                assert_eq!(page, clusters[usize::from(c)][..4096]);
            }
            assert!(
                matches!(img.read_at(&mut page, 8192), Err(Error::Format { .. })),
                "read_only {read_only}"
            );
        }
    }

    #[test]
    fn a_decompressed_cluster_is_not_read_once_its_stream_is_freed_and_the_space_reused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.qcow2");
        let (clusters, hosts) = compressed_clusters(&p, 1);
        let img = open_rw(&p);
        let q = qcow2(&img);
        let mut page = vec![0u8; 4096];
        img.read_at(&mut page, 0).unwrap();
        assert_eq!(page, clusters[0][..4096]);
        // Rewriting cluster 0 copies it elsewhere and frees its stream's host cluster.
        img.write_at(&[7u8; 65536], 0).unwrap();
        img.flush().unwrap();
        // A new stream takes the freed host cluster: the same host offset, other contents.
        let other: Vec<u8> = (0..65536u32).map(|j| (j / 200).to_le_bytes()[0]).collect();
        assert!(CompressedWriter::new().write(q, 65536, &other).unwrap());
        assert_eq!(stream_at(q, 65536), hosts[0], "the space was not reused");
        img.read_at(&mut page, 65536).unwrap();
        assert!(page == other[..4096], "the freed stream's cluster was read");
        img.read_at(&mut page, 0).unwrap();
        assert_eq!(page, [7u8; 4096]);
        drop(img);
        assert_consistent(&p, false);
    }
}
