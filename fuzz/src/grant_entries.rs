//! Fuzz target `grant_entries`: the grant-table hypervisor model of `grant-table`
//! ([`Xen`]) over grant entries a guest wrote, v1 and v2.
//!
//! Three domains (1 and 2, the back-ends; 5, the guest) each put a grant table in
//! their own RAM (v1 or v2 as the first byte picks; the guest's of one or two frames),
//! and the input fills the first entries with arbitrary bytes. Then up to 48
//! operations:
//!
//! - `map_grant_ref` by any domain (or none) of any domain's ref (small refs, the table
//!   boundaries, any `u32`) with any `GNTMAP_*` flags and host address;
//! - `unmap_grant_ref` of live handles or made-up ones, with matching or wrong host
//!   and bus addresses;
//! - `copy` between grant refs and local frames, any offsets, lengths and flags;
//! - guest writes: well-formed grants (permit, read-only, sub-page, transitive, other
//!   types) to any domain and frame, raw bytes anywhere in the table and status
//!   frames;
//! - `set_version` (then the table set up again) and domain death.
//!
//! Checked, besides "no panic":
//! - a map that succeeds refers to an entry whose flags allowed it: when nothing held
//!   the entry, `GTF_permit_access` without `GTF_sub_page`, granted to the mapper,
//!   not `GTF_readonly` for a writable map, and the bus address is the entry's frame;
//!   when the mapper already held it, only that mapper, at the same frame, and a first
//!   writable map only of an entry not read-only now; the status word then holds
//!   `GTF_reading` (and `GTF_writing`); `mapped_frame` says what the map returned; an
//!   auto-translated mapper never gets a device, application or PTE map;
//! - unmaps return exactly the status a model of the maptrack predicts (bad handle,
//!   bus or host address mismatch, partial unmaps), and after every operation each
//!   entry's pin word is the sum of the live maps' pins, each mapper holds exactly its
//!   live handles, and a domain exists exactly while alive or still mapped;
//! - a copy that succeeds had permission on each side (local frames only of the
//!   caller, grants permitted to the caller or passed on transitively, not read-only
//!   for the destination, inside a sub-page window, inside the page), and moved the
//!   source's bytes to the destination;
//! - `set_version` refuses exactly while an entry is mapped.
//!
//! - A copy by a caller that is not a live domain fails (`GNTST_bad_domain`), as a map
//!   by one does (this target found that it used to succeed; see the README).

use crate::input::Input;
use grant_table::abi::*;
use grant_table::xen::{
    Caller, CopyPtr, DomainConfig, GrantCopy, MapGrantRef, MappedFrame, SetupTable, UnmapGrantRef,
};
use grant_table::{DomId, Gfn, GrantError, GrantHandle, GrantRef, GrantStatus, Mem, Xen};
use std::collections::BTreeSet;
use vm_memory::{Bytes, GuestAddress};

const MAX_OPS: usize = 48;
/// The domains: two back-ends, then the guest.
const IDS: [u16; 3] = [1, 2, 5];
/// Pages of RAM of each.
const PAGES: [u64; 3] = [4, 8, 16];
/// Domain ids an operation may name: the three, one that does not exist, DOMID_SELF.
const NAMES: [u16; 5] = [1, 2, 5, 9, DOMID_SELF];

struct Dom {
    id: u16,
    mem: Mem,
    config: DomainConfig,
    version: u32,
    /// GPAs of the grant frames and (v2) status frames.
    frames: Vec<u64>,
    status: Vec<u64>,
    live: bool,
}

impl Dom {
    fn nr_entries(&self) -> u32 {
        self.frames.len() as u32 * entries_per_frame(self.version)
    }

    fn entry_gpa(&self, r: u32) -> Option<u64> {
        if r >= self.nr_entries() {
            return None;
        }
        let per = entries_per_frame(self.version);
        Some(self.frames[(r / per) as usize] + u64::from(r % per) * entry_size(self.version))
    }

    fn status_gpa(&self, r: u32) -> Option<u64> {
        if self.version == 2 {
            self.entry_gpa(r)?;
            Some(self.status[(r / STATUS_PER_FRAME) as usize] + u64::from(r % STATUS_PER_FRAME) * 2)
        } else {
            self.entry_gpa(r)
        }
    }

    fn entry(&self, r: u32) -> Option<Entry> {
        let e = self.entry_gpa(r)?;
        let rd16 = |o: u64| self.mem.read_obj::<u16>(GuestAddress(e + o)).ok();
        let flags = rd16(0)?;
        let domid = rd16(2)?;
        let (frame, page_off, length) = if self.version == 1 {
            let f: u32 = self.mem.read_obj(GuestAddress(e + 4)).ok()?;
            (u64::from(f), 0, PAGE_SIZE as u16)
        } else {
            let f: u64 = self.mem.read_obj(GuestAddress(e + 8)).ok()?;
            (f, rd16(4)?, rd16(6)?)
        };
        let trans_domid = rd16(4)?;
        Some(Entry {
            flags,
            domid,
            frame,
            sub_page: self.version == 2 && flags & GTF_SUB_PAGE != 0,
            page_off,
            length,
            trans_domid,
        })
    }

    /// Sets the table up as at the start (after `set_version`, too).
    fn setup(&mut self, xen: &Xen, frames: usize) {
        let grant: Vec<Gfn> = (1..=frames as u64).map(Gfn).collect();
        let status: Vec<Gfn> = if self.version == 2 {
            let n = status_frames_for(frames as u32) as u64;
            (frames as u64 + 1..=frames as u64 + n).map(Gfn).collect()
        } else {
            Vec::new()
        };
        let mut op = SetupTable {
            dom: DomId(self.id),
            frame_list: grant.clone(),
            status_frame_list: status.clone(),
            status: GrantStatus::GeneralError,
        };
        xen.setup_table(DomId(self.id), &mut op);
        assert_eq!(op.status, GrantStatus::Okay, "setup_table of {}", self.id);
        self.frames = grant.iter().map(|g| g.0 * PAGE_SIZE).collect();
        self.status = status.iter().map(|g| g.0 * PAGE_SIZE).collect();
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    flags: u16,
    domid: u16,
    frame: u64,
    sub_page: bool,
    page_off: u16,
    length: u16,
    trans_domid: u16,
}

/// A live map in the model.
#[derive(Clone, Copy, Debug)]
struct Map {
    mapper: u16,
    handle: u32,
    granter: u16,
    gref: u32,
    /// `GNTMAP_*` still held.
    flags: u32,
    gpa: u64,
    host_addr: u64,
}

impl Map {
    fn ro(&self) -> bool {
        self.flags & GNTMAP_READONLY != 0
    }

    fn pin(&self) -> u32 {
        let mut p = 0;
        if self.flags & GNTMAP_HOST_MAP != 0 {
            p += if self.ro() {
                GNTPIN_HSTR_INC
            } else {
                GNTPIN_HSTW_INC
            };
        }
        if self.flags & GNTMAP_DEVICE_MAP != 0 {
            p += if self.ro() {
                GNTPIN_DEVR_INC
            } else {
                GNTPIN_DEVW_INC
            };
        }
        p
    }
}

struct World {
    xen: Xen,
    doms: Vec<Dom>,
    maps: Vec<Map>,
    /// Every (granter, ref) an operation named: their pins are checked.
    touched: BTreeSet<(u16, u32)>,
    guest_frames: usize,
}

impl World {
    fn dom(&self, id: u16) -> Option<&Dom> {
        self.doms.iter().find(|d| d.id == id)
    }

    fn live(&self, id: u16) -> Option<&Dom> {
        self.dom(id).filter(|d| d.live)
    }

    /// Xen still holds a domain while it lives or another maps one of its grants.
    fn exists(&self, id: u16) -> bool {
        self.live(id).is_some() || self.maps.iter().any(|m| m.granter == id)
    }

    fn maps_of(&self, granter: u16, gref: u32) -> Vec<Map> {
        self.maps
            .iter()
            .filter(|m| m.granter == granter && m.gref == gref)
            .copied()
            .collect()
    }

    fn check(&self) {
        for &id in &IDS {
            assert_eq!(
                self.xen.domain_exists(DomId(id)),
                self.exists(id),
                "domain {id}"
            );
            let held = self.maps.iter().filter(|m| m.mapper == id).count();
            assert_eq!(self.xen.maptrack_in_use(DomId(id)), held, "handles of {id}");
        }
        for &(granter, gref) in &self.touched {
            let want: u32 = self.maps_of(granter, gref).iter().map(Map::pin).sum();
            let got = self.xen.active_pin(DomId(granter), GrantRef(gref));
            if want == 0 {
                assert!(
                    matches!(got, None | Some(0)),
                    "{granter}/{gref}: pin {got:?}"
                );
            } else {
                assert_eq!(got, Some(want), "pin of {granter}/{gref}");
            }
        }
    }
}

/// The target's body: panics if a checked contract breaks.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let Some(c) = inp.u8() else {
        return;
    };
    let xen = Xen::new();
    let mut doms = Vec::new();
    for (i, (&id, &pages)) in IDS.iter().zip(&PAGES).enumerate() {
        let mem = Mem::from_ranges(&[(GuestAddress(0), (pages * PAGE_SIZE) as usize)])
            .expect("domain RAM");
        let config = DomainConfig {
            // Domain 1 is a PV back-end (device maps allowed) when bit 3 is set.
            auto_translated: !(id == 1 && c & 8 != 0),
            // The guest's transitive grants are refused when bit 4 is set.
            transitive: !(id == 5 && c & 0x10 != 0),
            max_maptrack_frames: 1,
            ..DomainConfig::default()
        };
        xen.create_domain(DomId(id), mem.clone(), config)
            .expect("create domain");
        let version = 1 + u32::from((c >> i) & 1);
        xen.set_version(DomId(id), version).expect("set_version");
        doms.push(Dom {
            id,
            mem,
            config,
            version,
            frames: Vec::new(),
            status: Vec::new(),
            live: true,
        });
    }
    let guest_frames = if c & 0x20 != 0 { 2 } else { 1 };
    for d in &mut doms {
        let frames = if d.id == 5 { guest_frames } else { 1 };
        d.setup(&xen, frames);
    }
    // The guest's first entries, then domain 2's: arbitrary bytes.
    for id in [5u16, 2] {
        let Some(n) = inp.u8() else {
            return;
        };
        let d = doms.iter().find(|d| d.id == id).expect("domain");
        let bytes = inp.up_to(usize::from(n % 17) * entry_size(d.version) as usize);
        d.mem
            .write_slice(bytes, GuestAddress(d.frames[0]))
            .expect("table frame");
    }
    let mut w = World {
        xen,
        doms,
        maps: Vec::new(),
        touched: BTreeSet::new(),
        guest_frames,
    };
    for _ in 0..MAX_OPS {
        let Some(tag) = inp.u8() else {
            break;
        };
        let done = match tag % 8 {
            0 | 1 => map(&mut w, &mut inp),
            2 => unmap(&mut w, &mut inp),
            3 => copy(&mut w, &mut inp),
            4 => grant(&mut w, &mut inp),
            5 => raw_write(&mut w, &mut inp),
            6 => set_version(&mut w, &mut inp),
            _ => destroy(&mut w, &mut inp),
        };
        if done.is_none() {
            break;
        }
        w.check();
    }
    w.check();
}

fn name(inp: &mut Input<'_>) -> Option<u16> {
    Some(NAMES[usize::from(inp.u8()?) % NAMES.len()])
}

/// A grant ref: small mostly, the tables' boundaries, or anything.
fn gref(inp: &mut Input<'_>) -> Option<u32> {
    let b = inp.u8()?;
    Some(match b {
        0..=0xdf => u32::from(b % 20),
        0xe0..=0xef => [255, 256, 511, 512, 1023, 1024, 2047, 2048][usize::from(b % 8)],
        _ => inp.u32()?,
    })
}

fn map(w: &mut World, inp: &mut Input<'_>) -> Option<()> {
    let caller = name(inp)?;
    let granter = name(inp)?;
    let r = gref(inp)?;
    let flags = u32::from(inp.u8()? & 0x1f);
    let host_addr = u64::from(inp.u8()?) << 12;
    w.touched.insert((granter, r));
    let before = w.live(granter).and_then(|d| d.entry(r));
    let held = w.maps_of(granter, r);
    let mut op = [MapGrantRef::new(
        DomId(granter),
        GrantRef(r),
        flags,
        host_addr,
    )];
    w.xen.map_grant_ref(Caller::new(DomId(caller)), &mut op);
    let op = op[0];
    if op.status != GrantStatus::Okay {
        return Some(());
    }
    let ld = w.live(caller).expect("a map by a domain that is not alive");
    let rd = w
        .live(granter)
        .expect("a map of a domain that is not alive");
    assert_ne!(
        flags & (GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP),
        0,
        "map without host or device"
    );
    if ld.config.auto_translated {
        let pv_only = GNTMAP_DEVICE_MAP | GNTMAP_APPLICATION_MAP | GNTMAP_CONTAINS_PTE;
        assert_eq!(
            flags & pv_only,
            0,
            "PV-only map flags {flags:#x} for an HVM mapper"
        );
    }
    let ro = flags & GNTMAP_READONLY != 0;
    let e = before.unwrap_or_else(|| panic!("map of ref {r} beyond the table of {granter}"));
    if held.is_empty() {
        assert_eq!(e.flags & GTF_TYPE_MASK, GTF_PERMIT_ACCESS, "map of {e:?}");
        assert_eq!(e.flags & GTF_SUB_PAGE, 0, "map of a sub-page grant {e:?}");
        assert_eq!(e.domid, caller, "map by {caller} of {e:?}");
        if !ro {
            assert_eq!(e.flags & GTF_READONLY, 0, "writable map of {e:?}");
        }
        assert_eq!(Some(op.dev_bus_addr), e.frame.checked_mul(PAGE_SIZE));
        let st: u16 = rd
            .mem
            .read_obj(GuestAddress(rd.status_gpa(r).expect("in the table")))
            .expect("status word");
        assert_ne!(st & GTF_READING, 0, "status {st:#x} after a map");
        if !ro {
            assert_ne!(st & GTF_WRITING, 0, "status {st:#x} after a writable map");
        }
    } else {
        for m in &held {
            assert_eq!(
                m.mapper, caller,
                "{caller} maps an entry {} holds",
                m.mapper
            );
        }
        assert_eq!(op.dev_bus_addr, held[0].gpa, "second map of another frame");
        let writers = held.iter().any(|m| !m.ro());
        if !ro && !writers {
            assert_eq!(e.flags & GTF_READONLY, 0, "first writable map of {e:?}");
        }
    }
    assert!(
        w.maps
            .iter()
            .all(|m| !(m.mapper == caller && m.handle == op.handle.0)),
        "handle {} handed out twice",
        op.handle.0
    );
    assert_eq!(
        w.xen.mapped_frame(DomId(caller), op.handle),
        Some(MappedFrame {
            granter: DomId(granter),
            gpa: op.dev_bus_addr,
            writable: !ro,
        })
    );
    w.maps.push(Map {
        mapper: caller,
        handle: op.handle.0,
        granter,
        gref: r,
        flags,
        gpa: op.dev_bus_addr,
        host_addr,
    });
    Some(())
}

fn unmap(w: &mut World, inp: &mut Input<'_>) -> Option<()> {
    let sel = inp.u8()?;
    let (caller, handle, known) = if sel & 1 == 0 && !w.maps.is_empty() {
        let m = w.maps[usize::from(sel >> 1) % w.maps.len()];
        (m.mapper, m.handle, Some(m))
    } else {
        let caller = name(inp)?;
        let handle = if sel & 2 != 0 {
            inp.u32()?
        } else {
            u32::from(inp.u8()?)
        };
        (caller, handle, None)
    };
    let hsel = inp.u8()?;
    let host_addr = match hsel % 3 {
        0 => 0,
        1 => known.map_or(0x1000, |m| m.host_addr),
        _ => u64::from(inp.u8()?) << 12,
    };
    let dev_bus_addr = match (hsel / 3) % 3 {
        0 => 0,
        1 => known.map_or(0x1000, |m| m.gpa),
        _ => u64::from(inp.u8()?) << 12,
    };
    let mut op = [UnmapGrantRef::new(
        GrantHandle(handle),
        host_addr,
        dev_bus_addr,
    )];
    w.xen.unmap_grant_ref(Caller::new(DomId(caller)), &mut op);
    // The model: which map, and what the unmap does to it.
    let i = w
        .maps
        .iter()
        .position(|m| m.mapper == caller && m.handle == handle);
    let want = if !w.exists(caller) {
        GrantStatus::BadDomain
    } else if let Some(i) = i {
        let m = w.maps[i];
        let host = m.flags & GNTMAP_HOST_MAP != 0;
        let dev = m.flags & GNTMAP_DEVICE_MAP != 0;
        if dev_bus_addr != 0 && dev && dev_bus_addr != m.gpa {
            GrantStatus::BadDevAddr
        } else if host_addr != 0 && host && host_addr != m.host_addr {
            GrantStatus::GeneralError
        } else {
            let mut f = m.flags;
            if host_addr != 0 && host {
                f &= !GNTMAP_HOST_MAP;
            }
            if dev_bus_addr != 0 && dev {
                f &= !GNTMAP_DEVICE_MAP;
            }
            if f & (GNTMAP_HOST_MAP | GNTMAP_DEVICE_MAP) == 0 {
                w.maps.remove(i);
            } else {
                w.maps[i].flags = f;
            }
            GrantStatus::Okay
        }
    } else {
        GrantStatus::BadHandle
    };
    assert_eq!(
        op[0].status, want,
        "unmap of handle {handle} by {caller} (host {host_addr:#x}, bus {dev_bus_addr:#x})"
    );
    Some(())
}

/// One side of a copy from the input.
fn copy_ptr(inp: &mut Input<'_>) -> Option<(CopyPtr, bool)> {
    let k = inp.u8()?;
    let is_gref = k & 1 != 0;
    let domid = if is_gref || k & 2 != 0 {
        name(inp)?
    } else {
        DOMID_SELF
    };
    let u = if is_gref {
        u64::from(gref(inp)?)
    } else if k & 4 != 0 {
        inp.u64()?
    } else {
        u64::from(inp.u8()? % 20)
    };
    let offset = if k & 8 != 0 {
        inp.u16()? % 4200
    } else {
        u16::from(inp.u8()?) * 16
    };
    Some((
        CopyPtr {
            u,
            domid: DomId(domid),
            offset,
        },
        is_gref,
    ))
}

fn copy(w: &mut World, inp: &mut Input<'_>) -> Option<()> {
    let caller = name(inp)?;
    let (source, sg) = copy_ptr(inp)?;
    let (dest, dg) = copy_ptr(inp)?;
    let l = inp.u8()?;
    let len = if l & 1 != 0 {
        inp.u16()? % 4200
    } else {
        u16::from(l >> 1) * 8
    };
    let mut op = GrantCopy::new(source, sg, dest, dg, len);
    if l & 0x80 != 0 {
        op.flags = inp.u16()?;
    }
    let (sg, dg) = (
        op.flags & GNTCOPY_SOURCE_GREF != 0,
        op.flags & GNTCOPY_DEST_GREF != 0,
    );
    let resolve = |p: &CopyPtr| {
        if p.domid.0 == DOMID_SELF {
            caller
        } else {
            p.domid.0
        }
    };
    for (p, g) in [(&source, sg), (&dest, dg)] {
        if g {
            if let Ok(r) = u32::try_from(p.u) {
                w.touched.insert((resolve(p), r));
            }
        }
    }
    // Where each side's bytes are, when the model knows: (domain, GPA).
    let place = |p: &CopyPtr, g: bool| -> Option<(u16, u64)> {
        let d = w.live(resolve(p))?;
        if !g {
            return Some((d.id, p.u.checked_mul(PAGE_SIZE)?));
        }
        let r = u32::try_from(p.u).ok()?;
        if let Some(m) = w.maps_of(d.id, r).first() {
            return Some((d.id, m.gpa));
        }
        let e = d.entry(r)?;
        (e.flags & GTF_TYPE_MASK == GTF_PERMIT_ACCESS)
            .then_some((d.id, e.frame.checked_mul(PAGE_SIZE)?))
    };
    let src_at = place(&source, sg);
    let dst_at = place(&dest, dg);
    let src_bytes = src_at.and_then(|(d, gpa)| {
        let mut b = vec![0u8; usize::from(len)];
        let mem = &w.dom(d)?.mem;
        let at = gpa.checked_add(u64::from(source.offset))?;
        mem.read_slice(&mut b, GuestAddress(at)).ok()?;
        Some(b)
    });
    let entries = [(&source, sg), (&dest, dg)].map(|(p, g)| {
        let r = u32::try_from(p.u).ok()?;
        g.then(|| w.live(resolve(p)).and_then(|d| d.entry(r)))?
    });
    let mut ops = [op];
    w.xen.copy(Caller::new(DomId(caller)), &mut ops);
    if ops[0].status != GrantStatus::Okay {
        return Some(());
    }
    // Only a live domain makes hypercalls, as for a map.
    assert!(
        w.live(caller).is_some(),
        "a copy by {caller}, which is not alive"
    );
    for (i, (p, g)) in [(&source, sg), (&dest, dg)].into_iter().enumerate() {
        assert!(
            u32::from(p.offset) + u32::from(len) <= PAGE_SIZE as u32,
            "copy beyond the page: {op:?}"
        );
        let owner = resolve(p);
        let d = w
            .live(owner)
            .expect("a copy with a domain that is not alive");
        if !g {
            assert_eq!(
                p.domid.0, DOMID_SELF,
                "a copy with another domain's frame: {op:?}"
            );
            continue;
        }
        let r = u32::try_from(p.u).expect("a ref beyond grant_ref_t");
        let e = entries[i].unwrap_or_else(|| panic!("ref {r} beyond the table of {owner}"));
        let write = i == 1;
        let held = w.maps_of(owner, r);
        if !held.is_empty() {
            for m in &held {
                assert_eq!(
                    m.mapper, caller,
                    "{caller} copies with an entry {} holds",
                    m.mapper
                );
            }
            if write && held.iter().all(Map::ro) {
                assert_eq!(e.flags & GTF_READONLY, 0, "copy into {e:?}");
            }
            continue;
        }
        assert_eq!(e.domid, caller, "copy by {caller} with {e:?}");
        if write {
            assert_eq!(e.flags & GTF_READONLY, 0, "copy into {e:?}");
        }
        match e.flags & GTF_TYPE_MASK {
            GTF_PERMIT_ACCESS if e.sub_page => {
                let (start, end) = (
                    u32::from(e.page_off),
                    u32::from(e.page_off) + u32::from(e.length),
                );
                let (a, b) = (u32::from(p.offset), u32::from(p.offset) + u32::from(len));
                assert!(start <= a && b <= end, "copy of [{a}, {b}) outside {e:?}");
            }
            GTF_PERMIT_ACCESS => {}
            GTF_TRANSITIVE => {
                assert_eq!(d.version, 2, "a transitive v1 entry {e:?}");
                assert!(d.config.transitive, "transitive grants of {owner} are off");
                assert_ne!(e.trans_domid, owner, "self-referential {e:?}");
            }
            t => panic!("copy with an entry of type {t}: {e:?}"),
        }
    }
    // The bytes moved, unless the two ranges overlap or one is a table's frame (Xen
    // sets and clears the entries' status bits there while it copies).
    let table_page = |(d, gpa): (u16, u64)| {
        w.dom(d)
            .is_some_and(|d| d.frames.iter().chain(&d.status).any(|&f| f == gpa))
    };
    if let (Some((sd, sgpa)), Some((dd, dgpa)), Some(src)) = (src_at, dst_at, src_bytes) {
        if table_page((sd, sgpa)) || table_page((dd, dgpa)) {
            return Some(());
        }
        let (s, t) = (
            sgpa + u64::from(source.offset),
            dgpa + u64::from(dest.offset),
        );
        let overlap = sd == dd && s < t + u64::from(len) && t < s + u64::from(len);
        if !overlap {
            let mut got = vec![0u8; usize::from(len)];
            w.dom(dd)
                .expect("domain")
                .mem
                .read_slice(&mut got, GuestAddress(t))
                .expect("the copy's destination is RAM");
            assert_eq!(got, src, "copy moved other bytes: {op:?}");
        }
    }
    Some(())
}

/// A guest grants an entry as Linux writes one: the other fields, then the flags.
fn grant(w: &mut World, inp: &mut Input<'_>) -> Option<()> {
    let who = IDS[usize::from(inp.u8()?) % IDS.len()];
    let r = u32::from(inp.u8()? % 20);
    let kind = inp.u8()?;
    let to = name(inp)?;
    let frame = u64::from(inp.u8()? % 20);
    w.touched.insert((who, r));
    let d = w.dom(who)?;
    let Some(e) = d.entry_gpa(r) else {
        return Some(());
    };
    let m = &d.mem;
    let at = |o: u64| GuestAddress(e + o);
    let flags: u16 = match kind % 8 {
        0 | 1 => GTF_PERMIT_ACCESS,
        2 => GTF_PERMIT_ACCESS | GTF_READONLY,
        3 => GTF_PERMIT_ACCESS | GTF_SUB_PAGE,
        4 => GTF_TRANSITIVE,
        5 => GTF_INVALID,
        6 => GTF_ACCEPT_TRANSFER,
        _ => u16::from(inp.u8()?),
    } | if kind & 0x80 != 0 { GTF_READONLY } else { 0 };
    let _ = m.write_obj(to, at(2));
    if d.version == 1 {
        let _ = m.write_obj(frame as u32, at(4));
    } else if flags & GTF_TYPE_MASK == GTF_TRANSITIVE {
        let _ = m.write_obj(NAMES[usize::from(kind >> 3) % NAMES.len()], at(4));
        let _ = m.write_obj(u32::from(inp.u8()? % 20), at(8));
    } else {
        if flags & GTF_SUB_PAGE != 0 {
            let _ = m.write_obj(u16::from(inp.u8()?) * 16, at(4));
            let _ = m.write_obj(u16::from(inp.u8()?) * 16, at(6));
        }
        let _ = m.write_obj(frame, at(8));
    }
    let _ = m.write_obj(flags, at(0));
    Some(())
}

/// Raw guest bytes anywhere in a table's grant or status frames.
fn raw_write(w: &mut World, inp: &mut Input<'_>) -> Option<()> {
    let who = IDS[usize::from(inp.u8()?) % IDS.len()];
    let off = inp.u16()?;
    let n = 1 + usize::from(inp.u8()? % 8);
    let bytes = inp.bytes(n)?;
    let d = w.dom(who)?;
    let frames: Vec<u64> = d.frames.iter().chain(&d.status).copied().collect();
    if frames.is_empty() {
        return Some(());
    }
    let f = frames[usize::from(off >> 12) % frames.len()];
    let _ = d
        .mem
        .write_slice(bytes, GuestAddress(f + u64::from(off & 0xfff)));
    Some(())
}

fn set_version(w: &mut World, inp: &mut Input<'_>) -> Option<()> {
    let who = name(inp)?;
    let v = u32::from(inp.u8()? % 4);
    let r = w.xen.set_version(DomId(who), v);
    let Some(d) = w.live(who) else {
        assert_eq!(r, Err(GrantError::NoDomain(DomId(who))));
        return Some(());
    };
    let mapped = w.maps.iter().any(|m| m.granter == who);
    match r {
        Ok(()) if v == d.version => {}
        Ok(()) => {
            assert!(!mapped, "version of {who} changed while mapped");
            let frames = if who == 5 { w.guest_frames } else { 1 };
            let xen = &w.xen;
            let d = w.doms.iter_mut().find(|d| d.id == who).expect("domain");
            d.version = v;
            d.setup(xen, frames);
        }
        Err(GrantError::VersionInUse(_)) => {
            assert!(mapped && (1..=2).contains(&v) && v != d.version, "{r:?}");
        }
        Err(GrantError::BadVersion { .. }) => assert!(!(1..=2).contains(&v), "{r:?}"),
        Err(e) => panic!("set_version({who}, {v}): {e}"),
    }
    Some(())
}

fn destroy(w: &mut World, inp: &mut Input<'_>) -> Option<()> {
    let who = IDS[usize::from(inp.u8()?) % IDS.len()];
    let r = w.xen.destroy_domain(DomId(who));
    let was_live = w.live(who).is_some();
    assert_eq!(r.is_ok(), was_live, "destroy_domain({who}): {r:?}");
    if was_live {
        w.maps.retain(|m| m.mapper != who);
        if let Some(d) = w.doms.iter_mut().find(|d| d.id == who) {
            d.live = false;
        }
    }
    Some(())
}
