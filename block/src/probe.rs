//! Recognising an image's format by its magic: qcow2, which the engine reads, and the formats
//! QEMU reads and this engine does not, which are refused by name (with the qemu-img command that
//! converts them) instead of being read as a raw disk that would show the guest their metadata.
//!
//! The magics are the ones each format's specification puts in its header (or, for dmg, its
//! trailer); a fixed-size VHD, whose only marker is a footer at the end, probes as raw, as in QEMU.

use std::path::Path;

use crate::file::HostFile;
use crate::qcow2;
use crate::Error;

/// An image format QEMU reads and this engine does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foreign {
    /// VMware (sparse extent, or a text descriptor).
    Vmdk,
    /// Hyper-V VHDX.
    Vhdx,
    /// Virtual PC / VHD (dynamic).
    Vpc,
    /// VirtualBox VDI.
    Vdi,
    /// QEMU enhanced disk.
    Qed,
    /// qcow version 1.
    Qcow,
    /// Apple disk image.
    Dmg,
    /// LUKS encrypted volume.
    Luks,
}

impl Foreign {
    /// Every foreign format.
    pub const ALL: [Foreign; 8] = [
        Foreign::Vmdk,
        Foreign::Vhdx,
        Foreign::Vpc,
        Foreign::Vdi,
        Foreign::Qed,
        Foreign::Qcow,
        Foreign::Dmg,
        Foreign::Luks,
    ];

    /// qemu-img's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            Foreign::Vmdk => "vmdk",
            Foreign::Vhdx => "vhdx",
            Foreign::Vpc => "vpc",
            Foreign::Vdi => "vdi",
            Foreign::Qed => "qed",
            Foreign::Qcow => "qcow",
            Foreign::Dmg => "dmg",
            Foreign::Luks => "luks",
        }
    }

    /// Parses qemu-img's name of a foreign format.
    pub fn parse(s: &str) -> Option<Foreign> {
        Foreign::ALL.into_iter().find(|f| f.name() == s)
    }

    /// The qemu-img command line that converts `path` (an image of this format) to qcow2, next
    /// to it.
    pub fn convert_line(self, path: &Path) -> String {
        let mut out = path.with_extension("qcow2");
        if out == path {
            out = path.with_extension("converted.qcow2");
        }
        match self {
            Foreign::Luks => format!(
                "qemu-img convert --object secret,id=sec0,file=PASSPHRASE_FILE -O qcow2 \
                 --image-opts driver=luks,key-secret=sec0,file.filename={} {}",
                path.display(),
                out.display()
            ),
            _ => format!(
                "qemu-img convert -f {} -O qcow2 {} {}",
                self.name(),
                path.display(),
                out.display()
            ),
        }
    }
}

/// What a file's magic says it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probed {
    /// A qcow2 image (version 2 or later).
    Qcow2,
    /// A format this engine does not read.
    Foreign(Foreign),
    /// Nothing recognised: a raw disk.
    Raw,
}

/// Bytes read from the start of the file.
const HEAD: usize = 512;

/// The first non-comment, non-blank line of a VMDK text descriptor is `version=N`.
fn vmdk_descriptor(head: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(head.split(|&b| b == 0).next().unwrap_or(&[])) else {
        return false;
    };
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .is_some_and(|l| l.starts_with("version=") && text.contains("createType="))
}

/// What `head` (the first bytes of a file) and `tail` (its last 512 bytes) say.
fn classify(head: &[u8; HEAD], tail: &[u8; 512]) -> Probed {
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if be32(head, 0) == qcow2::validate_magic() {
        return if be32(head, 4) == 1 {
            Probed::Foreign(Foreign::Qcow)
        } else {
            Probed::Qcow2
        };
    }
    let foreign = if head.starts_with(b"KDMV") || head.starts_with(b"COWD") || vmdk_descriptor(head)
    {
        Foreign::Vmdk
    } else if head.starts_with(b"vhdxfile") {
        Foreign::Vhdx
    } else if head.starts_with(b"conectix") {
        Foreign::Vpc
    } else if head[0x40..0x44] == 0xbeda_107f_u32.to_le_bytes() {
        Foreign::Vdi
    } else if head.starts_with(b"QED\0") {
        Foreign::Qed
    } else if head.starts_with(b"LUKS\xba\xbe") {
        Foreign::Luks
    } else if tail.starts_with(b"koly") {
        Foreign::Dmg
    } else {
        return Probed::Raw;
    };
    Probed::Foreign(foreign)
}

/// Reads the magic of `f`.
pub(crate) fn sniff(f: &HostFile) -> Result<Probed, Error> {
    let mut head = [0u8; HEAD];
    f.read_at(&mut head, 0)?;
    let mut tail = [0u8; 512];
    let len = f.len()?;
    if len >= 512 {
        f.read_at(&mut tail, len - 512)?;
    }
    Ok(classify(&head, &tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(at: usize, bytes: &[u8]) -> [u8; HEAD] {
        let mut h = [0u8; HEAD];
        h[at..at + bytes.len()].copy_from_slice(bytes);
        h
    }

    #[test]
    fn magics_name_their_formats() {
        let none = [0u8; 512];
        let cases: [(&[u8], usize, Probed); 9] = [
            (b"QFI\xfb\0\0\0\x01", 0, Probed::Foreign(Foreign::Qcow)),
            (b"QFI\xfb\0\0\0\x03", 0, Probed::Qcow2),
            (b"KDMV", 0, Probed::Foreign(Foreign::Vmdk)),
            (b"vhdxfile", 0, Probed::Foreign(Foreign::Vhdx)),
            (b"conectix", 0, Probed::Foreign(Foreign::Vpc)),
            (b"\x7f\x10\xda\xbe", 0x40, Probed::Foreign(Foreign::Vdi)),
            (b"QED\0", 0, Probed::Foreign(Foreign::Qed)),
            (b"LUKS\xba\xbe\0\x01", 0, Probed::Foreign(Foreign::Luks)),
            (b"QEX\0", 0, Probed::Raw),
        ];
        for (bytes, at, want) in cases {
            assert_eq!(classify(&head_with(at, bytes), &none), want, "{bytes:?}");
        }
        let mut koly = [0u8; 512];
        koly[..4].copy_from_slice(b"koly");
        assert_eq!(classify(&[0u8; HEAD], &koly), Probed::Foreign(Foreign::Dmg));
        let desc = b"# Disk DescriptorFile\nversion=1\nCID=1\ncreateType=\"monolithicFlat\"\n";
        assert_eq!(
            classify(&head_with(0, desc), &none),
            Probed::Foreign(Foreign::Vmdk)
        );
        // Text that only mentions the keys is a raw disk.
        let prose = b"a note: version=1 and createType= are vmdk keys\n";
        assert_eq!(classify(&head_with(0, prose), &none), Probed::Raw);
    }

    #[test]
    fn the_convert_line_names_the_format_and_a_new_file() {
        let l = Foreign::Vmdk.convert_line(Path::new("d/disk.vmdk"));
        assert_eq!(
            l,
            "qemu-img convert -f vmdk -O qcow2 d/disk.vmdk d/disk.qcow2"
        );
        let l = Foreign::Qcow.convert_line(Path::new("old.qcow2"));
        assert_eq!(
            l,
            "qemu-img convert -f qcow -O qcow2 old.qcow2 old.converted.qcow2"
        );
    }
}
