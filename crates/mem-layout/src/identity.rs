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
//! Shared regions (Xen `intel_iommu_assign_device`, reference/grants-pools-reserved.md
//! §3.7 item 1): a region whose device list names more than one device is *shared*.
//! Under strict, assigning one sharer without the others is refused, whether or not the
//! others are assigned anywhere yet — the sharers left behind (with the host, or in
//! another guest) keep DMAing into the region the guest's device now reaches too. The
//! refusal names the device, the range and every other sharer. Relaxed allows it with
//! Xen's "risky" warning. The quarantine guest ([`QUARANTINE`], Xen's `DOMID_IO`) is
//! always relaxed.
//!
//! Group assignment is what Xen's comment asks for and never built ("group device
//! assignment interface to make sure devices sharing RMRR are assigned to the same
//! domain together"): [`Assignments::assign_group`] assigns several devices to one guest
//! in one request, and a region all of whose sharers end up in that guest is no longer
//! shared across guests, so strict allows it. A sharer already in the same guest counts
//! as part of the group. Unassigning follows the same rule
//! ([`Assignments::unassign_group`]): taking some sharers out of a guest while others
//! stay splits the region again — strict refuses, relaxed warns; taking the whole
//! group out together is fine.

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
    /// Strict: the region is shared with devices that would not be in the same guest
    /// (Xen: "It's disallowed to assign %pp with shared RMRR at … for %pd").
    #[error("it is disallowed to assign {device} to guest {guest}: reserved region {range} is shared with {others}, which would not be in guest {guest}; assign every sharer together (a group) or use the relaxed policy (strict policy)")]
    SharedRegion {
        /// The device being assigned.
        device: Bdf,
        /// Its target guest.
        guest: DomId,
        /// The shared range.
        range: MemRange,
        /// Every other sharer left outside the guest, as text.
        others: String,
    },
    /// Strict: unassigning these devices leaves other sharers of a region in the guest.
    #[error("it is disallowed to unassign {device} from guest {guest} alone: reserved region {range} is shared with {others}, which stay in guest {guest}; unassign every sharer together or use the relaxed policy (strict policy)")]
    SplitsGroup {
        /// The device being unassigned.
        device: Bdf,
        /// Its guest.
        guest: DomId,
        /// The shared range.
        range: MemRange,
        /// The sharers that would stay, as text.
        others: String,
    },
    /// The same device named twice in one group request.
    #[error("{0} is named twice in one group")]
    Duplicate(Bdf),
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

    /// Assigns one device to `guest` under `policy`: [`Self::assign_group`] with a
    /// group of one.
    ///
    /// # Errors
    /// As [`Self::assign_group`].
    pub fn assign(
        &mut self,
        device: Bdf,
        guest: DomId,
        policy: Policy,
    ) -> Result<Vec<String>, IdentityError> {
        self.assign_group(&[device], guest, policy)
    }

    /// Assigns `devices` to `guest` together, under `policy`: the shared-region rule
    /// (sharers outside the group and outside the guest make a region shared), then an
    /// identity map for each direct region of each device. Returns the warnings of
    /// relaxed conflicts. All or nothing.
    ///
    /// # Errors
    /// [`IdentityError::SharedRegion`] and [`IdentityError::Occupied`] under strict;
    /// unknown guest; a device already assigned or named twice. On error nothing
    /// changed.
    pub fn assign_group(
        &mut self,
        devices: &[Bdf],
        guest: DomId,
        policy: Policy,
    ) -> Result<Vec<String>, IdentityError> {
        let mut group = std::collections::BTreeSet::new();
        for device in devices {
            if let Some((owner, _)) = self.owners.get(device) {
                return Err(IdentityError::AlreadyAssigned {
                    device: *device,
                    owner: *owner,
                });
            }
            if !group.insert(*device) {
                return Err(IdentityError::Duplicate(*device));
            }
        }
        let mut space = self
            .guests
            .get(&guest)
            .cloned()
            .ok_or(IdentityError::UnknownGuest(guest))?;
        // Xen: the quarantine domain is always relaxed.
        let policy = if guest == QUARANTINE {
            Policy::Relaxed
        } else {
            policy
        };
        let mut warnings = Vec::new();
        for &device in devices {
            for region in self.db.for_device(device).filter(|r| r.kind.is_direct()) {
                // Shared-region rule: every sharer must end up in this guest.
                let outside: Vec<Bdf> = region
                    .devices
                    .iter()
                    .filter(|d| !group.contains(*d))
                    .filter(|d| self.owners.get(*d).map(|(g, _)| *g) != Some(guest))
                    .copied()
                    .collect();
                if !outside.is_empty() {
                    let others = device_list(&outside);
                    match policy {
                        Policy::Strict => {
                            return Err(IdentityError::SharedRegion {
                                device,
                                guest,
                                range: region.range,
                                others,
                            })
                        }
                        Policy::Relaxed => warnings.push(format!(
                            "it is risky to assign {device} to guest {guest}: reserved region {} is shared with {others}, which stay outside it; assigned anyway (relaxed)",
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
        }
        self.guests.insert(guest, space);
        for device in group {
            self.owners.insert(device, (guest, policy));
        }
        Ok(warnings)
    }

    /// Unassigns one device: [`Self::unassign_group`] with a group of one.
    ///
    /// # Errors
    /// As [`Self::unassign_group`].
    pub fn unassign(&mut self, device: Bdf) -> Result<Vec<String>, IdentityError> {
        self.unassign_group(&[device])
    }

    /// Unassigns `devices` together: drops exactly their references; maps left with
    /// none go. Each device's region must not stay shared with sharers left in its
    /// guest — refused if the device was assigned strict, a "risky" warning if relaxed.
    /// Returns the warnings. All or nothing.
    ///
    /// # Errors
    /// [`IdentityError::NotAssigned`], [`IdentityError::Duplicate`],
    /// [`IdentityError::SplitsGroup`]. On error nothing changed.
    pub fn unassign_group(&mut self, devices: &[Bdf]) -> Result<Vec<String>, IdentityError> {
        let mut group = std::collections::BTreeSet::new();
        for device in devices {
            if !self.owners.contains_key(device) {
                return Err(IdentityError::NotAssigned(*device));
            }
            if !group.insert(*device) {
                return Err(IdentityError::Duplicate(*device));
            }
        }
        let mut warnings = Vec::new();
        for &device in devices {
            let Some(&(guest, policy)) = self.owners.get(&device) else {
                return Err(IdentityError::NotAssigned(device));
            };
            for region in self.db.for_device(device).filter(|r| r.kind.is_direct()) {
                let staying: Vec<Bdf> = region
                    .devices
                    .iter()
                    .filter(|d| !group.contains(*d))
                    .filter(|d| self.owners.get(*d).map(|(g, _)| *g) == Some(guest))
                    .copied()
                    .collect();
                if staying.is_empty() {
                    continue;
                }
                let others = device_list(&staying);
                match policy {
                    Policy::Strict => {
                        return Err(IdentityError::SplitsGroup {
                            device,
                            guest,
                            range: region.range,
                            others,
                        })
                    }
                    Policy::Relaxed => warnings.push(format!(
                        "it is risky to unassign {device} from guest {guest}: reserved region {} stays shared with {others} in it; unassigned anyway (relaxed)",
                        region.range
                    )),
                }
            }
        }
        for device in group {
            if let Some((guest, _)) = self.owners.remove(&device) {
                if let Some(space) = self.guests.get_mut(&guest) {
                    for m in space.maps.values_mut() {
                        m.refs.remove(&device);
                    }
                    space.maps.retain(|_, m| m.count() > 0);
                }
            }
        }
        Ok(warnings)
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

    fn usb() -> [Bdf; 3] {
        [bdf("00:1d.0"), bdf("00:1a.0"), bdf("00:14.0")]
    }

    #[test]
    fn identity_second_device_with_same_rmrr_shares_the_map_by_refcount() {
        let mut a = thinkpad();
        a.assign_group(&usb(), G1, Policy::Strict)
            .expect("the whole group: fine");
        let maps = a.identity_maps(G1);
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].count(), 3);
    }

    #[test]
    fn identity_unassign_removes_exactly_its_own_references() {
        let mut a = thinkpad();
        a.assign_group(&usb(), G1, Policy::Relaxed).expect("ok");
        let w = a.unassign(bdf("00:1d.0")).expect("relaxed: allowed");
        assert!(w[0].contains("risky"), "{w:?}");
        let maps = a.identity_maps(G1);
        assert_eq!(
            maps[0].refs,
            [(bdf("00:1a.0"), 1), (bdf("00:14.0"), 1)].into()
        );
        a.unassign_group(&[bdf("00:1a.0"), bdf("00:14.0")])
            .expect("the rest of the group together");
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
    fn shared_rmrr_strict_refuses_one_sharer_alone_naming_it_the_range_and_every_other_sharer() {
        let mut a = thinkpad();
        // Nobody else is assigned anywhere: Xen refuses all the same.
        let e = a
            .assign(bdf("00:1a.0"), G1, Policy::Strict)
            .expect_err("strict refuses");
        assert!(matches!(e, IdentityError::SharedRegion { .. }), "{e:?}");
        let msg = e.to_string();
        for d in ["00:1a.0", "00:1d.0", "00:14.0", "[0xda2f0000-0xda306fff]"] {
            assert!(msg.contains(d), "{msg} lacks {d}");
        }
        assert_eq!(a.owner(bdf("00:1a.0")), None);
        assert!(a.identity_maps(G1).is_empty(), "a refusal leaves no trace");
    }

    #[test]
    fn shared_rmrr_strict_refuses_a_sharer_whose_partner_is_in_another_guest() {
        let mut a = thinkpad();
        a.assign(bdf("00:1d.0"), G1, Policy::Relaxed)
            .expect("relaxed");
        let e = a
            .assign_group(&[bdf("00:1a.0"), bdf("00:14.0")], G2, Policy::Strict)
            .expect_err("00:1d.0 sits in guest 1");
        assert!(e.to_string().contains("00:1d.0"), "{e}");
        assert_eq!(a.owner(bdf("00:14.0")), None);
    }

    #[test]
    fn shared_rmrr_relaxed_allows_with_the_risky_warning() {
        let mut a = thinkpad();
        let w = a
            .assign(bdf("00:1a.0"), G2, Policy::Relaxed)
            .expect("relaxed");
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("risky"), "{w:?}");
        assert!(
            w[0].contains("00:1d.0") && w[0].contains("00:14.0"),
            "{w:?}"
        );
        assert_eq!(a.owner(bdf("00:1a.0")), Some(G2));
    }

    #[test]
    fn shared_rmrr_quarantine_is_always_relaxed() {
        let mut a = thinkpad();
        let w = a
            .assign(bdf("00:1a.0"), QUARANTINE, Policy::Strict)
            .expect("quarantine is relaxed");
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("risky"), "{w:?}");
    }

    #[test]
    fn group_assignment_of_every_sharer_is_allowed_under_strict() {
        let mut a = thinkpad();
        assert_eq!(a.assign_group(&usb(), G1, Policy::Strict), Ok(vec![]));
        for d in usb() {
            assert_eq!(a.owner(d), Some(G1));
        }
    }

    #[test]
    fn group_assignment_missing_a_sharer_is_refused_naming_it() {
        let mut a = thinkpad();
        let e = a
            .assign_group(&[bdf("00:1d.0"), bdf("00:1a.0")], G1, Policy::Strict)
            .expect_err("00:14.0 is missing");
        let msg = e.to_string();
        assert!(
            msg.contains("shared with 00:14.0,") || msg.contains("shared with 00:14.0 "),
            "{msg}"
        );
        assert_eq!(a.owner(bdf("00:1d.0")), None, "all or nothing");
        assert_eq!(
            a.assign_group(&[bdf("00:1d.0"), bdf("00:1d.0")], G1, Policy::Strict),
            Err(IdentityError::Duplicate(bdf("00:1d.0")))
        );
    }

    #[test]
    fn group_a_sharer_already_in_the_same_guest_counts_as_part_of_the_group() {
        let mut a = thinkpad();
        a.assign(bdf("00:1d.0"), G1, Policy::Relaxed)
            .expect("relaxed");
        assert_eq!(
            a.assign_group(&[bdf("00:1a.0"), bdf("00:14.0")], G1, Policy::Strict),
            Ok(vec![]),
            "all three end up in guest 1"
        );
    }

    #[test]
    fn unassign_one_member_of_a_strict_group_is_refused_and_the_whole_group_is_not() {
        let mut a = thinkpad();
        a.assign_group(&usb(), G1, Policy::Strict).expect("ok");
        let e = a
            .unassign(bdf("00:14.0"))
            .expect_err("the others would stay");
        assert!(matches!(e, IdentityError::SplitsGroup { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("00:1d.0") && msg.contains("00:1a.0"), "{msg}");
        assert_eq!(a.owner(bdf("00:14.0")), Some(G1), "nothing changed");
        assert_eq!(a.identity_maps(G1)[0].count(), 3);
        assert_eq!(a.unassign_group(&usb()), Ok(vec![]));
        assert!(a.identity_maps(G1).is_empty());
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
