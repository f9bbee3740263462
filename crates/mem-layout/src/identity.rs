//! Device assignment: identity maps for a device's direct regions, and the rule for
//! regions several devices share.
//!
//! Identity maps follow Xen (`iommu_identity_mapping` in
//! `xen/drivers/passthrough/x86/iommu.c`, `p2m_add_identity_entry` in
//! `xen/arch/x86/mm/p2m.c`): each guest keeps a refcounted list of identity maps;
//! mapping a range that is unoccupied installs it; mapping the identical range again
//! only takes a reference; anything else (RAM or MMIO underneath, an overlapping but
//! different identity map) is a conflict — strict: the assignment fails and leaves no
//! trace; relaxed: a warning and the range is left unmapped (Xen's "Cannot setup
//! identity map … gfn already mapped"). Unassigning removes exactly the references the
//! device took; the last reference removes the map.
//!
//! Shared regions (Xen `intel_iommu_assign_device`): a device whose region is shared
//! with a device already in another guest is refused under strict — the refusal names
//! both devices and the range — and allowed with a warning under relaxed. The
//! quarantine guest ([`QUARANTINE`], Xen's `DOMID_IO`) is always relaxed.

use crate::layout::{E820Kind, Layout};
use crate::rdm::{device_list, RdmDatabase};
use crate::types::{Bdf, MemRange, Policy};
use std::collections::BTreeMap;

pub use dma_types::DomId;

/// The quarantine guest devices park in between owners (Xen `DOMID_IO`): always relaxed.
pub const QUARANTINE: DomId = DomId(0x7FF1);

/// Errors of this module: assignments refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No such guest was added.
    #[error("guest {0} is unknown")]
    UnknownGuest(DomId),
    /// The device is already assigned.
    #[error("{device} is already assigned to guest {owner}")]
    AlreadyAssigned {
        /// The device.
        device: Bdf,
        /// Its current guest.
        owner: DomId,
    },
    /// The device is not assigned.
    #[error("{0} is not assigned")]
    NotAssigned(Bdf),
    /// Strict: the region is shared with devices in another guest.
    #[error("cannot assign {device} to guest {guest}: it shares reserved region {range} with {others} in guest {other_guest} (strict policy)")]
    SharedRegion {
        /// The device being assigned.
        device: Bdf,
        /// Its target guest.
        guest: DomId,
        /// The shared range.
        range: MemRange,
        /// The sharers in the other guest, as text.
        others: String,
        /// The other guest.
        other_guest: DomId,
    },
    /// Strict: something other than the identical identity map occupies the range.
    #[error("cannot identity-map {range} for {device} in guest {guest}: {occupant} is there (strict policy)")]
    Occupied {
        /// The device being assigned.
        device: Bdf,
        /// Its target guest.
        guest: DomId,
        /// The range to map.
        range: MemRange,
        /// What occupies it.
        occupant: String,
    },
}

/// One identity map and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMap {
    /// The range, guest physical == host physical.
    pub range: MemRange,
    /// References per device (a device holds one per region).
    pub refs: BTreeMap<Bdf, u32>,
}

impl IdentityMap {
    /// Total references.
    pub fn count(&self) -> u32 {
        self.refs.values().sum()
    }
}

/// One guest's physical address space as far as identity maps care.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct GuestSpace {
    /// RAM and MMIO: (range, what it is).
    occupied: Vec<(MemRange, String)>,
    /// Identity maps by range.
    maps: BTreeMap<MemRange, IdentityMap>,
}

/// Which devices are in which guest, and each guest's identity maps.
#[derive(Debug, Clone, Default)]
pub struct Assignments {
    db: RdmDatabase,
    guests: BTreeMap<DomId, GuestSpace>,
    owners: BTreeMap<Bdf, (DomId, Policy)>,
}

impl Assignments {
    /// Assignments over the host's regions.
    pub fn new(db: RdmDatabase) -> Self {
        Self {
            db,
            ..Self::default()
        }
    }

    /// Adds a guest whose RAM and MMIO are `occupied` (range, description).
    pub fn add_guest(&mut self, id: DomId, occupied: Vec<(MemRange, String)>) {
        self.guests.insert(
            id,
            GuestSpace {
                occupied,
                maps: BTreeMap::new(),
            },
        );
    }

    /// Adds a guest built from a planned layout: its RAM is occupied.
    pub fn add_guest_from_layout(&mut self, id: DomId, layout: &Layout) {
        let occupied = layout
            .e820
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| (e.range, format!("guest RAM {}", e.range)))
            .collect();
        self.add_guest(id, occupied);
    }

    /// The identity maps of a guest.
    pub fn identity_maps(&self, id: DomId) -> Vec<&IdentityMap> {
        self.guests
            .get(&id)
            .map(|g| g.maps.values().collect())
            .unwrap_or_default()
    }

    /// The guest a device is in.
    pub fn owner(&self, bdf: Bdf) -> Option<DomId> {
        self.owners.get(&bdf).map(|(d, _)| *d)
    }

    /// Assigns `device` to `guest` under `policy`: the shared-region rule, then an
    /// identity map for each direct region. Returns the warnings of relaxed conflicts.
    ///
    /// # Errors
    /// [`IdentityError::SharedRegion`] and [`IdentityError::Occupied`] under strict;
    /// unknown guest; already assigned. On error nothing changed.
    pub fn assign(
        &mut self,
        device: Bdf,
        guest: DomId,
        policy: Policy,
    ) -> Result<Vec<String>, IdentityError> {
        if let Some((owner, _)) = self.owners.get(&device) {
            return Err(IdentityError::AlreadyAssigned {
                device,
                owner: *owner,
            });
        }
        let mut space = self
            .guests
            .get(&guest)
            .cloned()
            .ok_or(IdentityError::UnknownGuest(guest))?;
        let policy = if guest == QUARANTINE {
            Policy::Relaxed
        } else {
            policy
        };
        let mut warnings = Vec::new();
        for region in self.db.for_device(device).filter(|r| r.kind.is_direct()) {
            // Shared-region rule: sharers already in another guest.
            let mut elsewhere: BTreeMap<DomId, Vec<Bdf>> = BTreeMap::new();
            for other in region.devices.iter().filter(|d| **d != device) {
                if let Some((g, _)) = self.owners.get(other) {
                    if *g != guest {
                        elsewhere.entry(*g).or_default().push(*other);
                    }
                }
            }
            for (other_guest, others) in elsewhere {
                let others = device_list(&others);
                match policy {
                    Policy::Strict => {
                        return Err(IdentityError::SharedRegion {
                            device,
                            guest,
                            range: region.range,
                            others,
                            other_guest,
                        })
                    }
                    Policy::Relaxed => warnings.push(format!(
                        "risky: {device} shares reserved region {} with {others} in guest {other_guest}; assigned anyway (relaxed)",
                        region.range
                    )),
                }
            }
            // Identity map: unoccupied → map; identical → reference; else conflict.
            let occupant = if let Some(m) = space.maps.get_mut(&region.range) {
                *m.refs.entry(device).or_insert(0) += 1;
                continue;
            } else if let Some(m) = space
                .maps
                .values()
                .find(|m| m.range.overlaps(&region.range))
            {
                format!("identity map {} of {}", m.range, device_list(m.refs.keys()))
            } else if let Some((_, what)) = space
                .occupied
                .iter()
                .find(|(r, _)| r.overlaps(&region.range))
            {
                what.clone()
            } else {
                space.maps.insert(
                    region.range,
                    IdentityMap {
                        range: region.range,
                        refs: [(device, 1)].into(),
                    },
                );
                continue;
            };
            match policy {
                Policy::Strict => {
                    return Err(IdentityError::Occupied {
                        device,
                        guest,
                        range: region.range,
                        occupant,
                    })
                }
                Policy::Relaxed => warnings.push(format!(
                    "cannot identity-map {} for {device} in guest {guest}: {occupant} is there; left unmapped (relaxed)",
                    region.range
                )),
            }
        }
        self.guests.insert(guest, space);
        self.owners.insert(device, (guest, policy));
        Ok(warnings)
    }

    /// Unassigns a device: drops exactly its references; maps left with none go.
    ///
    /// # Errors
    /// [`IdentityError::NotAssigned`].
    pub fn unassign(&mut self, device: Bdf) -> Result<(), IdentityError> {
        let (guest, _) = self
            .owners
            .remove(&device)
            .ok_or(IdentityError::NotAssigned(device))?;
        if let Some(space) = self.guests.get_mut(&guest) {
            for m in space.maps.values_mut() {
                m.refs.remove(&device);
            }
            space.maps.retain(|_, m| m.count() > 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reserved_regions::ResvRegion;
    use crate::types::RegionKind;
    use std::collections::BTreeSet;

    const G1: DomId = DomId(1);
    const G2: DomId = DomId(2);

    fn bdf(s: &str) -> Bdf {
        s.parse().expect("valid bdf")
    }

    fn r(s: u64, e: u64) -> MemRange {
        MemRange::new(s, e).expect("valid")
    }

    /// The ThinkPad's shape: USB RMRR shared by 00:1d.0, 00:1a.0, 00:14.0; IGD its own.
    fn thinkpad() -> Assignments {
        let mut db = RdmDatabase::new();
        let usb = [ResvRegion {
            range: r(0xDA2F_0000, 0xDA30_6FFF),
            kind: RegionKind::Direct,
        }];
        let set: BTreeSet<Bdf> = ["00:1d.0", "00:1a.0", "00:14.0"]
            .iter()
            .map(|d| bdf(d))
            .collect();
        db.add_reserved_regions(&usb, &set, "usb").expect("ok");
        let igd = [ResvRegion {
            range: r(0xDB80_0000, 0xDF9F_FFFF),
            kind: RegionKind::Direct,
        }];
        db.add_reserved_regions(&igd, &[bdf("00:02.0")].into(), "igd")
            .expect("ok");
        let mut a = Assignments::new(db);
        for g in [G1, G2, QUARANTINE] {
            a.add_guest(g, vec![(r(0, 0x7FFF_FFFF), "guest RAM".into())]);
        }
        a
    }

    #[test]
    fn identity_unoccupied_range_is_mapped() {
        let mut a = thinkpad();
        assert_eq!(a.assign(bdf("00:02.0"), G1, Policy::Strict), Ok(vec![]));
        let maps = a.identity_maps(G1);
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].range, r(0xDB80_0000, 0xDF9F_FFFF));
        assert_eq!(maps[0].count(), 1);
    }

    #[test]
    fn identity_second_device_with_same_rmrr_shares_the_map_by_refcount() {
        let mut a = thinkpad();
        a.assign(bdf("00:1d.0"), G1, Policy::Strict).expect("ok");
        a.assign(bdf("00:1a.0"), G1, Policy::Strict)
            .expect("same guest: fine");
        let maps = a.identity_maps(G1);
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].count(), 2);
    }

    #[test]
    fn identity_unassign_removes_exactly_its_own_references() {
        let mut a = thinkpad();
        a.assign(bdf("00:1d.0"), G1, Policy::Strict).expect("ok");
        a.assign(bdf("00:1a.0"), G1, Policy::Strict).expect("ok");
        a.unassign(bdf("00:1d.0")).expect("assigned");
        let maps = a.identity_maps(G1);
        assert_eq!(maps[0].refs, [(bdf("00:1a.0"), 1)].into());
        a.unassign(bdf("00:1a.0")).expect("assigned");
        assert!(
            a.identity_maps(G1).is_empty(),
            "last reference removes the map"
        );
        assert_eq!(
            a.unassign(bdf("00:1a.0")),
            Err(IdentityError::NotAssigned(bdf("00:1a.0")))
        );
    }

    #[test]
    fn identity_ram_underneath_strict_is_ebusy_relaxed_warns() {
        let mut db = RdmDatabase::new();
        let low = [ResvRegion {
            range: r(0x1000_0000, 0x1000_ffff),
            kind: RegionKind::Direct,
        }];
        db.add_reserved_regions(&low, &[bdf("00:14.0")].into(), "low")
            .expect("ok");
        let mut a = Assignments::new(db);
        a.add_guest(
            G1,
            vec![(r(0, 0x7FFF_FFFF), "guest RAM [0x0-0x7fffffff]".into())],
        );
        let e = a.assign(bdf("00:14.0"), G1, Policy::Strict);
        assert!(
            matches!(&e, Err(IdentityError::Occupied { occupant, .. }) if occupant.contains("guest RAM")),
            "{e:?}"
        );
        assert_eq!(
            a.owner(bdf("00:14.0")),
            None,
            "a refused assignment leaves no trace"
        );
        let w = a
            .assign(bdf("00:14.0"), G1, Policy::Relaxed)
            .expect("relaxed");
        assert_eq!(w.len(), 1);
        assert!(a.identity_maps(G1).is_empty(), "left unmapped");
    }

    #[test]
    fn identity_overlapping_different_range_conflicts() {
        let mut db = RdmDatabase::new();
        db.add_reserved_regions(
            &[ResvRegion {
                range: r(0xD000_0000, 0xD000_FFFF),
                kind: RegionKind::Direct,
            }],
            &[bdf("00:02.0")].into(),
            "a",
        )
        .expect("ok");
        let mut a = Assignments::new(db);
        a.add_guest(G1, vec![]);
        a.assign(bdf("00:02.0"), G1, Policy::Strict).expect("ok");
        // A second database view where 00:03.0 needs an overlapping, different range:
        // model it by a second Assignments sharing the guest's maps.
        let mut db2 = RdmDatabase::new();
        db2.add_reserved_regions(
            &[ResvRegion {
                range: r(0xD000_8000, 0xD001_7FFF),
                kind: RegionKind::Direct,
            }],
            &[bdf("00:03.0")].into(),
            "b",
        )
        .expect("ok");
        let mut b = Assignments::new(db2);
        b.guests = a.guests.clone();
        let e = b.assign(bdf("00:03.0"), G1, Policy::Strict);
        assert!(
            matches!(&e, Err(IdentityError::Occupied { occupant, .. }) if occupant.contains("identity map")),
            "{e:?}"
        );
        let w = b
            .assign(bdf("00:03.0"), G1, Policy::Relaxed)
            .expect("relaxed");
        assert_eq!(w.len(), 1);
        assert_eq!(b.identity_maps(G1).len(), 1);
    }

    #[test]
    fn shared_rmrr_strict_refuses_naming_the_devices_and_the_range() {
        let mut a = thinkpad();
        a.assign(bdf("00:1d.0"), G1, Policy::Strict).expect("ok");
        let e = a
            .assign(bdf("00:1a.0"), G2, Policy::Strict)
            .expect_err("strict refuses");
        let msg = e.to_string();
        assert!(msg.contains("00:1a.0") && msg.contains("00:1d.0"), "{msg}");
        assert!(msg.contains("[0xda2f0000-0xda306fff]"), "{msg}");
        assert_eq!(a.owner(bdf("00:1a.0")), None);
    }

    #[test]
    fn shared_rmrr_relaxed_allows_with_a_warning() {
        let mut a = thinkpad();
        a.assign(bdf("00:1d.0"), G1, Policy::Strict).expect("ok");
        let w = a
            .assign(bdf("00:1a.0"), G2, Policy::Relaxed)
            .expect("relaxed");
        assert!(w[0].contains("risky"), "{w:?}");
        assert_eq!(a.owner(bdf("00:1a.0")), Some(G2));
    }

    #[test]
    fn shared_rmrr_quarantine_is_always_relaxed() {
        let mut a = thinkpad();
        a.assign(bdf("00:1d.0"), G1, Policy::Strict).expect("ok");
        let w = a
            .assign(bdf("00:1a.0"), QUARANTINE, Policy::Strict)
            .expect("quarantine is relaxed");
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn require_direct_device_cannot_be_assigned_without_its_identity_map() {
        // The IGD's region lies on guest RAM in this guest: strict refuses the device.
        let mut a = thinkpad();
        a.add_guest(
            G2,
            vec![(r(0, 0xFFFF_FFFF), "guest RAM [0x0-0xffffffff]".into())],
        );
        assert!(matches!(
            a.assign(bdf("00:02.0"), G2, Policy::Strict),
            Err(IdentityError::Occupied { .. })
        ));
        assert!(a.identity_maps(G2).is_empty());
        assert_eq!(
            a.assign(bdf("00:02.0"), DomId(9), Policy::Strict),
            Err(IdentityError::UnknownGuest(DomId(9)))
        );
    }
}
