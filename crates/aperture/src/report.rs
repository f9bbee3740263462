//! What the demo observed, step by step, and its two renderings: a human-readable
//! report (plain ASCII, one line per step) and a JSON summary. The demo in
//! [`crate::demo`] fills a [`Report`]; nothing here talks to the device.

use serde_json::{json, Value};
use virtio_iommu::wire::{
    VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_READ, VIRTIO_IOMMU_FAULT_F_WRITE,
    VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_FAULT_R_UNKNOWN,
};
use virtio_iommu::{Counters, RequestType, Status};

/// How one step came out against what the demo expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Observed what was expected.
    Pass,
    /// Observed something else.
    Fail,
    /// Not run (it needs more endpoints than configured).
    Skip,
}

/// One checked step.
#[derive(Clone, Debug)]
pub struct Step {
    /// Section of the scenario the step belongs to.
    pub phase: &'static str,
    /// What was done.
    pub action: String,
    /// What was observed.
    pub observed: String,
    /// What the demo expected.
    pub expected: String,
    /// Whether they agree.
    pub outcome: Outcome,
    /// Further lines printed under the step (decoded properties, fault events).
    pub details: Vec<String>,
}

impl Step {
    /// A step without details.
    pub fn new(
        phase: &'static str,
        action: impl Into<String>,
        expected: impl Into<String>,
        observed: impl Into<String>,
        outcome: Outcome,
    ) -> Self {
        Self {
            phase,
            action: action.into(),
            observed: observed.into(),
            expected: expected.into(),
            outcome,
            details: Vec::new(),
        }
    }

    /// One line naming the step, what was expected and what happened.
    pub fn describe_failure(&self) -> String {
        format!(
            "{}: expected {}, got {}",
            self.action, self.expected, self.observed
        )
    }
}

/// One endpoint of the demo device.
#[derive(Clone, Debug)]
pub struct EndpointInfo {
    /// Endpoint ID (the PCI requester ID the VIOT table would assign).
    pub id: u32,
    /// Which device it stands for.
    pub name: String,
    /// Domain the guest attached it to, once it did.
    pub domain: Option<u32>,
    /// RESV_MEM properties decoded from its PROBE reply: (subtype, start, end).
    pub resv_mem: Vec<(&'static str, u64, u64)>,
}

impl EndpointInfo {
    /// `bus:slot.function` of the endpoint ID read as a PCI requester ID.
    pub fn pci(&self) -> String {
        format!(
            "{:02x}:{:02x}.{}",
            self.id >> 8,
            (self.id >> 3) & 0x1f,
            self.id & 7
        )
    }
}

/// The config space as the guest read it at init.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfigInfo {
    /// `page_size_mask`.
    pub page_size_mask: u64,
    /// `input_range` (inclusive).
    pub input_range: (u64, u64),
    /// `domain_range` (inclusive).
    pub domain_range: (u32, u32),
    /// `probe_size`.
    pub probe_size: u32,
    /// `bypass` at boot.
    pub bypass: u8,
}

/// A fault event as the guest received it on the eventq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultInfo {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    /// Endpoint that faulted.
    pub endpoint: u32,
    /// Faulting address.
    pub address: u64,
}

impl FaultInfo {
    /// The event in the words of Linux's log line, plus the reason.
    pub fn describe(&self) -> String {
        format!(
            "fault from endpoint {:#04x} at {:#x}: reason {}, flags {}",
            self.endpoint,
            self.address,
            reason_name(self.reason),
            fault_flags(self.flags).join("|")
        )
    }
}

/// Everything the demo did and saw.
#[derive(Debug, Default)]
pub struct Report {
    /// The endpoints, in configuration order.
    pub endpoints: Vec<EndpointInfo>,
    /// Config space at init.
    pub config: ConfigInfo,
    /// Checked steps, in order.
    pub steps: Vec<Step>,
    /// Fault events the guest received, in order.
    pub faults: Vec<FaultInfo>,
    /// Device counters at the end.
    pub counters: Option<Counters>,
}

impl Report {
    /// Steps whose outcome was not the expected one.
    pub fn failed(&self) -> Vec<&Step> {
        self.steps
            .iter()
            .filter(|s| s.outcome == Outcome::Fail)
            .collect()
    }

    /// Number of steps that were checked (not skipped).
    pub fn checked(&self) -> usize {
        self.count(Outcome::Pass) + self.count(Outcome::Fail)
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.steps.iter().filter(|s| s.outcome == outcome).count()
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = Vec::<String>::new();
        out.push(
            "Aperture demo: a guest driver programs the virtio-iommu the way Linux does;".into(),
        );
        out.push("device backends then reach guest memory only through what it mapped.".into());
        let eps: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| format!("{:#04x} {} (PCI {})", e.id, e.name, e.pci()))
            .collect();
        out.push(format!("endpoints: {}", eps.join(", ")));
        let mut phase = "";
        for step in &self.steps {
            if step.phase != phase {
                phase = step.phase;
                out.push(String::new());
                out.push(phase.to_string());
            }
            out.push(match step.outcome {
                Outcome::Pass => format!("  [ ok ] {}: {}", step.action, step.observed),
                Outcome::Skip => format!("  [skip] {}: {}", step.action, step.observed),
                Outcome::Fail => format!(
                    "  [FAIL] {}: {} (expected {})",
                    step.action, step.observed, step.expected
                ),
            });
            out.extend(step.details.iter().map(|d| format!("         {d}")));
        }
        if let Some(c) = &self.counters {
            out.push(String::new());
            out.push("device counters".into());
            for kind in RequestType::ALL {
                let cells: Vec<String> = Status::ALL
                    .iter()
                    .filter(|&&s| c.count(kind, s) > 0)
                    .map(|&s| format!("{} {}", status_name(s), c.count(kind, s)))
                    .collect();
                if !cells.is_empty() {
                    out.push(format!("  {:<7}{}", type_name(kind), cells.join(", ")));
                }
            }
            out.push(format!(
                "  faults raised {}, delivered {}, dropped {}; unparseable requests {}",
                c.faults_raised, c.faults_delivered, c.faults_dropped, c.unparseable
            ));
        }
        out.push(String::new());
        let failed = self.count(Outcome::Fail);
        let skipped = self.count(Outcome::Skip);
        let skip_note = if skipped > 0 {
            format!(", {skipped} skipped")
        } else {
            String::new()
        };
        out.push(format!(
            "result: {} ({} checks passed, {failed} failed{skip_note})",
            if failed == 0 { "PASS" } else { "FAIL" },
            self.count(Outcome::Pass),
        ));
        out.push(String::new());
        out.join("\n")
    }

    /// The JSON summary.
    pub fn to_json(&self) -> Value {
        let hex = |v: u64| format!("{v:#x}");
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "name": e.name,
                    "pci": e.pci(),
                    "domain": e.domain,
                    "resv_mem": e.resv_mem.iter().map(|&(kind, start, end)| json!({
                        "subtype": kind,
                        "start": hex(start),
                        "end": hex(end),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let c = &self.config;
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                json!({
                    "phase": s.phase,
                    "action": s.action,
                    "result": match s.outcome {
                        Outcome::Pass => "pass",
                        Outcome::Fail => "fail",
                        Outcome::Skip => "skip",
                    },
                    "observed": s.observed,
                    "expected": s.expected,
                    "details": s.details,
                })
            })
            .collect();
        let faults: Vec<Value> = self
            .faults
            .iter()
            .map(|f| {
                json!({
                    "reason": reason_name(f.reason),
                    "flags": fault_flags(f.flags),
                    "endpoint": f.endpoint,
                    "address": hex(f.address),
                })
            })
            .collect();
        let counters = self.counters.as_ref().map(|c| {
            let mut requests = serde_json::Map::new();
            for kind in RequestType::ALL {
                let mut by_status = serde_json::Map::new();
                for s in Status::ALL {
                    if c.count(kind, s) > 0 {
                        by_status.insert(status_name(s).into(), c.count(kind, s).into());
                    }
                }
                requests.insert(type_name(kind).into(), by_status.into());
            }
            json!({
                "requests": requests,
                "unparseable": c.unparseable,
                "domains": c.domains,
                "mappings": c.mappings,
                "faults_raised": c.faults_raised,
                "faults_delivered": c.faults_delivered,
                "faults_dropped": c.faults_dropped,
            })
        });
        json!({
            "ok": self.count(Outcome::Fail) == 0,
            "checks": {
                "passed": self.count(Outcome::Pass),
                "failed": self.count(Outcome::Fail),
                "skipped": self.count(Outcome::Skip),
            },
            "endpoints": endpoints,
            "config": {
                "page_size_mask": hex(c.page_size_mask),
                "input_range": [hex(c.input_range.0), hex(c.input_range.1)],
                "domain_range": [c.domain_range.0, c.domain_range.1],
                "probe_size": c.probe_size,
                "bypass": c.bypass,
            },
            "steps": steps,
            "faults": faults,
            "counters": counters,
        })
    }
}

/// The spec's name of a request type.
pub fn type_name(kind: RequestType) -> &'static str {
    match kind {
        RequestType::Attach => "ATTACH",
        RequestType::Detach => "DETACH",
        RequestType::Map => "MAP",
        RequestType::Unmap => "UNMAP",
        RequestType::Probe => "PROBE",
    }
}

/// The spec's name of a status (`VIRTIO_IOMMU_S_*` without the prefix).
pub fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "S_OK",
        Status::IoErr => "S_IOERR",
        Status::Unsupp => "S_UNSUPP",
        Status::DevErr => "S_DEVERR",
        Status::Inval => "S_INVAL",
        Status::Range => "S_RANGE",
        Status::NoEnt => "S_NOENT",
        Status::Fault => "S_FAULT",
        Status::NoMem => "S_NOMEM",
    }
}

/// The spec's name of a fault reason.
pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        VIRTIO_IOMMU_FAULT_R_UNKNOWN => "UNKNOWN",
        VIRTIO_IOMMU_FAULT_R_DOMAIN => "DOMAIN",
        VIRTIO_IOMMU_FAULT_R_MAPPING => "MAPPING",
        _ => "invalid",
    }
}

/// The names of the fault flags set in `flags` (unknown bits as hex).
pub fn fault_flags(flags: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = flags;
    for (bit, name) in [
        (VIRTIO_IOMMU_FAULT_F_READ, "READ"),
        (VIRTIO_IOMMU_FAULT_F_WRITE, "WRITE"),
        (VIRTIO_IOMMU_FAULT_F_ADDRESS, "ADDRESS"),
    ] {
        if flags & bit != 0 {
            out.push(name.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_shows_in_both_renderings() {
        let mut r = Report::default();
        r.steps
            .push(Step::new("p", "ok step", "a", "a", Outcome::Pass));
        r.steps
            .push(Step::new("p", "bad step", "S_OK", "S_INVAL", Outcome::Fail));
        assert_eq!(r.checked(), 2);
        assert_eq!(r.failed().len(), 1);
        let text = r.to_text();
        assert!(
            text.contains("[FAIL] bad step: S_INVAL (expected S_OK)"),
            "{text}"
        );
        assert!(
            text.contains("result: FAIL (1 checks passed, 1 failed)"),
            "{text}"
        );
        let json = r.to_json();
        assert_eq!(json["ok"], false);
        assert_eq!(json["steps"][1]["result"], "fail");
    }

    #[test]
    fn fault_flags_are_named() {
        assert_eq!(
            fault_flags(VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS | 0x80),
            ["WRITE", "ADDRESS", "0x80"]
        );
        assert_eq!(reason_name(VIRTIO_IOMMU_FAULT_R_DOMAIN), "DOMAIN");
    }
}
