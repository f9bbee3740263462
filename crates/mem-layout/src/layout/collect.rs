//! Step 1 of planning: which regions a plan considers, at which policy and with
//! which action, and the shared-region rule for the devices it assigns. The devices
//! of one plan go to one guest together, so they form a group: a direct region is
//! shared only if some sharer is left out, and then strict refuses it and relaxed
//! warns (the rule and its Xen origin are in [`crate::layout`] and [`crate::identity`]).

use super::{Action, Conflict, LayoutConfig, PlannedRegion};
use crate::rdm::{device_list, RdmDatabase};
use crate::types::{Bdf, MemRange, Policy, RegionKind, Strategy};
use std::collections::BTreeMap;

/// What [`collect`] found besides the regions.
pub(super) struct Collected {
    pub(super) regions: Vec<PlannedRegion>,
    /// Strict shared-region conflicts.
    pub(super) shared: Vec<Conflict>,
    /// Relaxed shared-region warnings.
    pub(super) warnings: Vec<String>,
}

/// Collects the regions to consider with their policy and action (step 1), and applies
/// the shared-region rule to the assigned devices.
pub(super) fn collect(cfg: &LayoutConfig, db: &RdmDatabase) -> Collected {
    let global = cfg.policy.unwrap_or(Policy::Relaxed);
    let mut chosen: BTreeMap<MemRange, PlannedRegion> = BTreeMap::new();
    if cfg.strategy == Strategy::Host {
        for r in db.regions() {
            chosen.insert(
                r.range,
                PlannedRegion {
                    range: r.range,
                    kind: r.kind,
                    devices: r.devices.iter().copied().collect(),
                    components: r.components.iter().cloned().collect(),
                    policy: global,
                    action: Action::Reserved,
                    source: r.source.clone(),
                },
            );
        }
    }
    let assigned: std::collections::BTreeSet<Bdf> = cfg.assigned.iter().map(|(b, _)| *b).collect();
    let mut shared = Vec::new();
    let mut warnings = Vec::new();
    // Which assigned devices have set their policy, for the strictest-wins rule.
    let mut from_device: BTreeMap<MemRange, Policy> = BTreeMap::new();
    for (bdf, own) in &cfg.assigned {
        // xl copies the global policy into each device; unset, libxl forces strict.
        let policy = own.or(cfg.policy).unwrap_or(Policy::Strict);
        for r in db.for_device(*bdf) {
            let entry = chosen.entry(r.range).or_insert_with(|| PlannedRegion {
                range: r.range,
                kind: r.kind,
                devices: r.devices.iter().copied().collect(),
                components: r.components.iter().cloned().collect(),
                policy,
                action: Action::Reserved,
                source: r.source.clone(),
            });
            let p = from_device.entry(r.range).or_insert(policy);
            *p = (*p).min(policy); // Strict < Relaxed: strictest wins.
            entry.policy = *p;
            if r.kind.is_direct() {
                entry.action = Action::Identity;
                // Shared-region rule: every other sharer must be assigned too.
                let outside: Vec<Bdf> = r
                    .devices
                    .iter()
                    .filter(|d| !assigned.contains(*d))
                    .copied()
                    .collect();
                if outside.is_empty() {
                    continue;
                }
                let others = device_list(&outside);
                // A relaxable region is safe to drop on assignment, so never strict.
                let rule = if r.kind == RegionKind::DirectRelaxable {
                    Policy::Relaxed
                } else {
                    policy
                };
                match rule {
                    Policy::Strict => shared.push(Conflict {
                        range: r.range,
                        devices: r.devices.iter().copied().collect(),
                        policy: Policy::Strict,
                        message: format!(
                            "it is disallowed to assign {bdf} with shared reserved region {} ({}): {others} need it too and would stay with the host; assign every sharer together (a group) or use the relaxed policy",
                            r.range, r.source
                        ),
                    }),
                    Policy::Relaxed => warnings.push(format!(
                        "it is risky to assign {bdf} with shared reserved region {} ({}): {others} need it too and stay with the host; assigned anyway (relaxed)",
                        r.range, r.source
                    )),
                }
            }
        }
    }
    let regions = chosen
        .into_values()
        .map(|mut r| {
            if r.kind == RegionKind::DirectRelaxable {
                r.policy = Policy::Relaxed;
            }
            r
        })
        .collect();
    Collected {
        regions,
        shared,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::tests::{assigned, bdf, db, GIB, MIB};
    use crate::layout::{plan, E820Kind, LayoutError};
    use crate::reserved_regions;

    #[test]
    fn layout_per_device_policy_overrides_global() {
        let d = db(&[(GIB, GIB + 0xfff, RegionKind::Direct, &["00:02.0"])]);
        let mut cfg = LayoutConfig::new(4 * GIB);
        cfg.policy = Some(Policy::Strict);
        assigned(&mut cfg, "00:02.0", Some(Policy::Relaxed));
        assert!(plan(&cfg, &d).is_ok(), "device relaxed beats global strict");
        cfg.policy = Some(Policy::Relaxed);
        cfg.assigned[0].1 = Some(Policy::Strict);
        assert!(
            plan(&cfg, &d).is_err(),
            "device strict beats global relaxed"
        );
        // An explicit global policy is copied into devices that set none (xl).
        cfg.assigned[0].1 = None;
        assert!(plan(&cfg, &d).is_ok());
    }

    #[test]
    fn layout_default_policies_are_global_relaxed_and_assigned_strict() {
        let d = db(&[
            (GIB, GIB + 0xfff, RegionKind::Direct, &["00:02.0"]),
            (
                GIB + MIB,
                GIB + MIB + 0xfff,
                RegionKind::Direct,
                &["00:14.0"],
            ),
        ]);
        let mut cfg = LayoutConfig::new(4 * GIB);
        cfg.strategy = Strategy::Host;
        let l = plan(&cfg, &d).expect("host regions default to relaxed");
        assert!(l.regions.iter().all(|r| r.action == Action::Dropped));
        assigned(&mut cfg, "00:14.0", None);
        match plan(&cfg, &d) {
            Err(LayoutError::StrictConflict(r)) => {
                let strict: Vec<_> = r
                    .conflicts
                    .iter()
                    .filter(|c| c.policy == Policy::Strict)
                    .collect();
                assert_eq!(strict.len(), 1);
                assert_eq!(strict[0].devices, vec![bdf("00:14.0")]);
            }
            other => panic!("expected strict conflict, got {other:?}"),
        }
    }

    #[test]
    fn layout_duplicates_with_the_same_start_are_merged() {
        // One RMRR listed by two groups' files: one region, both devices, one e820 entry.
        let r =
            reserved_regions::parse("0x00000000da2f0000 0x00000000da306fff direct\n").expect("ok");
        let mut d = RdmDatabase::new();
        d.add_reserved_regions(&r, &[bdf("00:1d.0")].into(), "g1")
            .expect("ok");
        d.add_reserved_regions(&r, &[bdf("00:1a.0")].into(), "g2")
            .expect("ok");
        let mut cfg = LayoutConfig::new(4 * GIB);
        assigned(&mut cfg, "00:1d.0", None);
        assigned(&mut cfg, "00:1a.0", Some(Policy::Relaxed));
        let l = plan(&cfg, &d).expect("plan");
        assert_eq!(l.regions.len(), 1);
        assert_eq!(l.regions[0].devices.len(), 2);
        assert_eq!(
            l.regions[0].policy,
            Policy::Strict,
            "strictest of the sharers"
        );
        assert_eq!(
            l.e820
                .iter()
                .filter(|e| e.kind == E820Kind::Reserved)
                .count(),
            1
        );
    }

    #[test]
    fn layout_host_strategy_adds_non_assigned_regions() {
        let d = db(&[(0xC800_0000, 0xC800_FFFF, RegionKind::Direct, &["00:1f.0"])]);
        let cfg = LayoutConfig::new(4 * GIB);
        assert!(
            plan(&cfg, &d).expect("plan").regions.is_empty(),
            "ignore: not assigned"
        );
        let mut cfg = LayoutConfig::new(4 * GIB);
        cfg.strategy = Strategy::Host;
        let l = plan(&cfg, &d).expect("plan");
        assert_eq!(l.regions[0].action, Action::Reserved);
        assert_eq!(l.regions[0].policy, Policy::Relaxed);
        assert!(l.e820.iter().any(|e| e.kind == E820Kind::Reserved));
    }

    #[test]
    fn layout_direct_relaxable_region_is_always_relaxed() {
        let d = db(&[(GIB, GIB + 0xfff, RegionKind::DirectRelaxable, &["00:14.0"])]);
        let mut cfg = LayoutConfig::new(4 * GIB);
        assigned(&mut cfg, "00:14.0", Some(Policy::Strict));
        let l = plan(&cfg, &d).expect("relaxable never fails the plan");
        assert_eq!(l.regions[0].action, Action::Dropped);
    }
}
