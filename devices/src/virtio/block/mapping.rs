//! Which iothread serves which queue: QEMU's `iothread-vq-mapping` property of virtio-blk
//! (QEMU 9.0 and later), with its rules and error messages.
//!
//! The mapping is a list of iothreads, each optionally with the queues (`vqs`) it serves. Either
//! every entry lists its queues, and then every queue is listed exactly once, or none does, and
//! the queues are dealt round-robin in list order (queue `i` to entry `i mod n`). An iothread
//! appears once and must exist. [`assign`] checks all that and returns each entry's queues, which
//! become the device's queue groups ([`super::Block::with_groups`]).

/// One entry of `iothread-vq-mapping`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VqMapping {
    /// The iothread's id (`-object iothread,id=`).
    pub iothread: String,
    /// The queues it serves; `None` deals them round-robin.
    pub vqs: Option<Vec<u16>>,
}

/// A mapping QEMU refuses, with QEMU's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// An empty list: no iothread to serve the queues.
    #[error("iothread-vq-mapping must list at least one IOThread")]
    Empty,
    /// No `-object iothread` with this id.
    #[error("IOThread \"{0}\" object does not exist")]
    UnknownIothread(String),
    /// The same iothread in two entries.
    #[error("duplicate IOThread name \"{0}\" in iothread-vq-mapping")]
    DuplicateIothread(String),
    /// Some entries list their queues and others do not.
    #[error("either all items in iothread-vq-mapping must have vqs or none of them must have it")]
    MixedVqs,
    /// A queue index past the device's queues.
    #[error(
        "vq index {vq} for IOThread \"{iothread}\" must be less than num_queues {num_queues} \
         in iothread-vq-mapping"
    )]
    VqOutOfRange {
        /// The queue index.
        vq: u16,
        /// The entry's iothread.
        iothread: String,
        /// The device's queues.
        num_queues: u16,
    },
    /// A queue listed twice.
    #[error("cannot assign vq {vq} to IOThread \"{iothread}\" because it is already assigned")]
    AlreadyAssigned {
        /// The queue index.
        vq: u16,
        /// The entry's iothread, the second to list it.
        iothread: String,
    },
    /// A queue no entry lists.
    #[error("missing vq {0} IOThread assignment in iothread-vq-mapping")]
    Missing(u16),
}

/// Checks `mapping` for a device with `num_queues` queues, whose iothreads exist where
/// `exists` says so, and returns the queues of each entry, in the mapping's order (an entry
/// may get none: more iothreads than queues, round-robin).
pub fn assign(
    mapping: &[VqMapping],
    num_queues: u16,
    exists: impl Fn(&str) -> bool,
) -> Result<Vec<Vec<u16>>, MappingError> {
    let explicit = mapping.first().ok_or(MappingError::Empty)?.vqs.is_some();
    let mut assigned = vec![false; usize::from(num_queues)];
    for (index, entry) in mapping.iter().enumerate() {
        let iothread = &entry.iothread;
        if !exists(iothread) {
            return Err(MappingError::UnknownIothread(iothread.clone()));
        }
        if mapping[..index].iter().any(|e| e.iothread == *iothread) {
            return Err(MappingError::DuplicateIothread(iothread.clone()));
        }
        if entry.vqs.is_some() != explicit {
            return Err(MappingError::MixedVqs);
        }
        for &vq in entry.vqs.iter().flatten() {
            let Some(seen) = assigned.get_mut(usize::from(vq)) else {
                return Err(MappingError::VqOutOfRange {
                    vq,
                    iothread: iothread.clone(),
                    num_queues,
                });
            };
            if std::mem::replace(seen, true) {
                return Err(MappingError::AlreadyAssigned {
                    vq,
                    iothread: iothread.clone(),
                });
            }
        }
    }
    if explicit {
        if let Some((vq, _)) = (0u16..).zip(&assigned).find(|(_, &seen)| !seen) {
            return Err(MappingError::Missing(vq));
        }
        return Ok(mapping
            .iter()
            .map(|e| e.vqs.clone().unwrap_or_default())
            .collect());
    }
    let n = mapping.len();
    Ok((0..n)
        .map(|entry| {
            (0..num_queues)
                .filter(|&q| usize::from(q) % n == entry)
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(iothread: &str, vqs: Option<&[u16]>) -> VqMapping {
        VqMapping {
            iothread: iothread.to_owned(),
            vqs: vqs.map(<[u16]>::to_vec),
        }
    }

    fn known(id: &str) -> bool {
        ["io0", "io1", "io2"].contains(&id)
    }

    #[test]
    fn queues_are_dealt_round_robin_without_vqs() {
        let two = [entry("io0", None), entry("io1", None)];
        assert_eq!(assign(&two, 4, known), Ok(vec![vec![0, 2], vec![1, 3]]));
        assert_eq!(assign(&two, 3, known), Ok(vec![vec![0, 2], vec![1]]));
        // More iothreads than queues: the last ones serve nothing.
        let three = [entry("io0", None), entry("io1", None), entry("io2", None)];
        assert_eq!(assign(&three, 2, known), Ok(vec![vec![0], vec![1], vec![]]));
        assert_eq!(assign(&two[..1], 3, known), Ok(vec![vec![0, 1, 2]]));
    }

    #[test]
    fn explicit_vqs_are_taken_as_listed() {
        let m = [entry("io1", Some(&[0, 2])), entry("io0", Some(&[3, 1]))];
        assert_eq!(assign(&m, 4, known), Ok(vec![vec![0, 2], vec![3, 1]]));
        // An entry may list no queue when the others list them all.
        let m = [entry("io0", Some(&[0, 1])), entry("io1", Some(&[]))];
        assert_eq!(assign(&m, 2, known), Ok(vec![vec![0, 1], vec![]]));
    }

    #[test]
    fn each_rule_is_refused_with_qemus_message() {
        let cases: [(Vec<VqMapping>, MappingError, &str); 7] = [
            (
                vec![],
                MappingError::Empty,
                "iothread-vq-mapping must list at least one IOThread",
            ),
            (
                vec![entry("io0", None), entry("io9", None)],
                MappingError::UnknownIothread("io9".into()),
                r#"IOThread "io9" object does not exist"#,
            ),
            (
                vec![entry("io0", None), entry("io0", None)],
                MappingError::DuplicateIothread("io0".into()),
                r#"duplicate IOThread name "io0" in iothread-vq-mapping"#,
            ),
            (
                vec![entry("io0", Some(&[0])), entry("io1", None)],
                MappingError::MixedVqs,
                "either all items in iothread-vq-mapping must have vqs or none of them must \
                 have it",
            ),
            (
                vec![entry("io0", Some(&[0, 1])), entry("io1", Some(&[4]))],
                MappingError::VqOutOfRange {
                    vq: 4,
                    iothread: "io1".into(),
                    num_queues: 4,
                },
                r#"vq index 4 for IOThread "io1" must be less than num_queues 4 in iothread-vq-mapping"#,
            ),
            (
                vec![entry("io0", Some(&[0, 1])), entry("io1", Some(&[2, 1, 3]))],
                MappingError::AlreadyAssigned {
                    vq: 1,
                    iothread: "io1".into(),
                },
                r#"cannot assign vq 1 to IOThread "io1" because it is already assigned"#,
            ),
            (
                vec![entry("io0", Some(&[0, 3])), entry("io1", Some(&[1]))],
                MappingError::Missing(2),
                "missing vq 2 IOThread assignment in iothread-vq-mapping",
            ),
        ];
        for (mapping, want, message) in cases {
            let got = assign(&mapping, 4, known);
            assert_eq!(got, Err(want), "{mapping:?}");
            let text = got.err().map(|e| e.to_string()).unwrap_or_default();
            assert_eq!(text, message);
        }
    }
}
