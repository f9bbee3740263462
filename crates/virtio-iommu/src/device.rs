//! The queue shell: [`VirtioIommu`] moves request bytes between virtqueues and the
//! pure [`Tables`], and fault events onto the eventq. It does no
//! I/O of its own: the VMM hands it a `virtio_queue` queue and any
//! `vm_memory::GuestMemory` when the guest kicks, and wires config-space accesses and
//! feature negotiation from its transport.

use crate::config::{ConfigError, IommuConfig};
use crate::ids::{DomainId, EndpointId};
use crate::request::{decode, DecodeError, Request, RequestType};
use crate::state::Tables;
use crate::translate::{EndpointIommu, FaultQueue, MappingSubscriber, Settle, Shared, Told};
use crate::wire::{
    Config, Status, CONFIG_BYPASS_OFFSET, MAX_READABLE, TAIL_SIZE, VIRTIO_F_VERSION_1,
    VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_DOMAIN_RANGE, VIRTIO_IOMMU_F_INPUT_RANGE,
    VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_MMIO, VIRTIO_IOMMU_F_PROBE, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use dma_types::{lock, read, write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use virtio_queue::QueueT;
use vm_memory::iommu::Iotlb;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::IntoBytes;

/// Feature bits this device offers. Legacy `VIRTIO_IOMMU_F_BYPASS` is never offered
/// (DEV-FEAT-2, DEV-FEAT-3). EVENT_IDX lets a polling device keep Linux's driver from
/// kicking, and spares the request queue, which has no callback, every interrupt: the
/// queue processing asks `needs_notification`, which honours `used_event`.
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
    | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
    | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
    | (1 << VIRTIO_IOMMU_F_PROBE)
    | (1 << VIRTIO_IOMMU_F_MMIO)
    | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);

/// Errors the VMM sees from the device. Guest mistakes in requests are never errors:
/// they are answered with a status.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The configuration was refused.
    #[error("invalid virtio-iommu configuration: {0}")]
    Config(#[from] ConfigError),
    /// The used ring could not be written: the guest's queue setup is broken, and the
    /// transport should set DEVICE_NEEDS_RESET.
    #[error("virtqueue error: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// A config-space access outside the 40-byte layout.
    #[error("config access of {len} bytes at offset {offset} is outside the 40-byte config space")]
    ConfigOutOfRange {
        /// Offset accessed.
        offset: u64,
        /// Length accessed.
        len: usize,
    },
    /// A config-space write the driver may not make (DRV-CFG-1, DRV-CFG-2).
    #[error("config write of {len} bytes at offset {offset} refused: {why}")]
    ConfigWriteRefused {
        /// Offset written.
        offset: u64,
        /// Length written.
        len: usize,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// An endpoint ID the configuration does not have.
    #[error("{0} is not configured on this virtio-iommu")]
    UnknownEndpoint(EndpointId),
}

/// A snapshot of the device's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests answered, by type ([`RequestType`] order) and status (wire value).
    pub requests: [[u64; 9]; 5],
    /// Requests returned unwritten with used length 0 (no head, unknown type, no room
    /// for the tail, or buffers the device cannot access).
    pub unparseable: u64,
    /// Live domains.
    pub domains: usize,
    /// Live mappings over all domains.
    pub mappings: usize,
    /// Bytes reachable through mappings, per endpoint, in configuration order.
    pub mapped_bytes: Vec<(EndpointId, u128)>,
    /// The most each endpoint could reach at one moment since boot.
    pub peak_exposure: Vec<(EndpointId, crate::state::Exposure)>,
    /// Denied accesses (each one a fault event, delivered or dropped).
    pub faults_raised: u64,
    /// Fault events delivered on the eventq.
    pub faults_delivered: u64,
    /// Fault events dropped: queue of pending faults full, no eventq buffer posted, or
    /// a buffer too small for one event (DEV-FLT-4).
    pub faults_dropped: u64,
    /// Requests that completed only after a subscriber settled (an out-of-process
    /// back-end acknowledged an invalidation), while later requests went on.
    pub deferred: u64,
    /// Time those requests spent parked, from their status being written to their
    /// completion, summed (ns).
    pub parked_ns: u64,
}

impl Counters {
    /// Requests of one type answered with one status.
    pub fn count(&self, kind: RequestType, status: Status) -> u64 {
        self.requests[kind as usize][status as usize]
    }
}

/// Where a request's response goes: the device-writable descriptors of its chain.
#[derive(Default)]
struct Writable {
    segs: Vec<(GuestAddress, u32)>,
    total: u64,
}

impl Writable {
    /// Walks `[offset, offset + len)` of the writable part, calling `piece(addr, at, n)`
    /// for each run of `n` bytes at guest address `addr`, `at` bytes into the range.
    /// False if a piece fails, an address wraps, or the range runs past the segments.
    fn walk(
        &self,
        mut offset: u64,
        len: u64,
        mut piece: impl FnMut(GuestAddress, usize, usize) -> bool,
    ) -> bool {
        let mut done = 0;
        for &(addr, seg) in &self.segs {
            let seg = u64::from(seg);
            if done == len {
                break;
            }
            if offset >= seg {
                offset -= seg;
                continue;
            }
            let n = (len - done).min(seg - offset);
            let Some(a) = addr.0.checked_add(offset) else {
                return false;
            };
            if !piece(GuestAddress(a), done as usize, n as usize) {
                return false;
            }
            done += n;
            offset = 0;
        }
        done == len
    }

    /// Writes `data` at byte `offset` of the writable part.
    fn write_at<M: GuestMemory>(&self, mem: &M, offset: u64, data: &[u8]) -> bool {
        self.walk(offset, data.len() as u64, |a, at, n| {
            mem.write_slice(&data[at..at + n], a).is_ok()
        })
    }

    /// Whether `[offset, offset + len)` of the writable part is writable memory.
    fn check<M: GuestMemory>(&self, mem: &M, offset: u64, len: u64) -> bool {
        self.walk(offset, len, |a, _, n| {
            mem.check_range(a, n, Permissions::Write)
        })
    }
}

/// A virtio-iommu device, VMM-agnostic. See the crate docs for how to embed it.
pub struct VirtioIommu {
    shared: Arc<Shared>,
    requests: [[AtomicU64; 9]; 5],
    unparseable: AtomicU64,
    faults_delivered: AtomicU64,
    writable: Writable,
    probe_buf: Vec<u8>,
    page_size_mask: u64,
    input_range: (u64, u64),
    domain_range: (u32, u32),
    acked_features: u64,
    /// Changes made by the request in hand, to be told to subscribers.
    told: Vec<Told>,
    /// Requests whose subscribers have not settled: head, used length, settlement,
    /// and when it was parked.
    /// At most one per descriptor the driver made available, so bounded by the queue.
    parked: Vec<(u16, u32, Settle, Instant)>,
    deferred: AtomicU64,
    parked_ns: AtomicU64,
}

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu")
            .field("shared", &self.shared)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl VirtioIommu {
    /// Builds a device in its boot state.
    ///
    /// # Errors
    /// [`DeviceError::Config`] if the configuration is invalid.
    pub fn new(config: &IommuConfig) -> Result<Self, DeviceError> {
        let reserved = config.validate()?;
        let tables = Tables::new(config, reserved);
        let n = tables.endpoint_count();
        let shared = Arc::new(Shared {
            tables: RwLock::new(tables),
            iotlbs: (0..n).map(|_| RwLock::new(Iotlb::new())).collect(),
            iotlb_fills: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            batches: (0..n).map(|_| Arc::default()).collect(),
            retaining: (0..n).map(|_| AtomicBool::new(false)).collect(),
            subscribers: RwLock::new(vec![Vec::new(); n]),
            has_subscribers: AtomicBool::new(false),
            faults: Mutex::new(FaultQueue::default()),
            max_pending_faults: config.limits.max_pending_faults,
            fault_notifier: RwLock::new(None),
            requestq_notifier: RwLock::new(None),
            faults_raised: AtomicU64::new(0),
            faults_dropped: AtomicU64::new(0),
        });
        Ok(Self {
            shared,
            requests: Default::default(),
            unparseable: AtomicU64::new(0),
            faults_delivered: AtomicU64::new(0),
            writable: Writable::default(),
            probe_buf: vec![0; config.probe_size as usize],
            page_size_mask: config.page_size_mask,
            input_range: (*config.input_range.start(), *config.input_range.end()),
            domain_range: (*config.domain_range.start(), *config.domain_range.end()),
            acked_features: 0,
            told: Vec::new(),
            parked: Vec::new(),
            deferred: AtomicU64::new(0),
            parked_ns: AtomicU64::new(0),
        })
    }

    /// Feature bits offered to the driver.
    pub fn device_features(&self) -> u64 {
        DEVICE_FEATURES
    }

    /// Records the features the driver accepted (masked by what is offered).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & DEVICE_FEATURES;
        write(&self.shared.tables).set_features(self.acked_features);
    }

    /// Features negotiated so far.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The 40-byte config space as it reads now.
    pub fn config(&self) -> Config {
        Config {
            page_size_mask: U64::new(self.page_size_mask),
            input_range_start: U64::new(self.input_range.0),
            input_range_end: U64::new(self.input_range.1),
            domain_range_start: U32::new(self.domain_range.0),
            domain_range_end: U32::new(self.domain_range.1),
            probe_size: U32::new(self.probe_buf.len() as u32),
            // DEV-CFG-4: only 0 or 1 is ever presented.
            bypass: u8::from(read(&self.shared.tables).bypass()),
            reserved: [0; 3],
        }
    }

    /// Reads config space at `offset`.
    ///
    /// # Errors
    /// [`DeviceError::ConfigOutOfRange`]; `data` is then left as it was.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let cfg = self.config();
        let bytes = cfg.as_bytes();
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| bytes.get(o..o.checked_add(data.len())?))
            .ok_or(DeviceError::ConfigOutOfRange {
                offset,
                len: data.len(),
            })?;
        data.copy_from_slice(src);
        Ok(())
    }

    /// Writes config space: only the `bypass` byte, only with BYPASS_CONFIG
    /// negotiated, only 0 or 1 (DRV-CFG-1, DRV-CFG-2). A refused write changes nothing.
    ///
    /// # Errors
    /// [`DeviceError::ConfigWriteRefused`] or [`DeviceError::ConfigOutOfRange`].
    pub fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let refuse = |why| DeviceError::ConfigWriteRefused {
            offset,
            len: data.len(),
            why,
        };
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size_of::<Config>() as u64)
        {
            return Err(DeviceError::ConfigOutOfRange {
                offset,
                len: data.len(),
            });
        }
        if offset != CONFIG_BYPASS_OFFSET as u64 || data.len() != 1 {
            return Err(refuse("only the 1-byte bypass field is writable"));
        }
        if self.acked_features & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG) == 0 {
            return Err(refuse("VIRTIO_IOMMU_F_BYPASS_CONFIG was not negotiated"));
        }
        let bypass = match data[0] {
            0 => false,
            1 => true,
            _ => return Err(refuse("bypass must be 0 or 1")),
        };
        let shared = &*self.shared;
        let mut told = Vec::new();
        write(&shared.tables).set_bypass(bypass, &mut |ep, ev| shared.on_event(ep, ev, &mut told));
        Shared::tell_unsettled(&mut told);
        Ok(())
    }

    /// The translation of one endpoint, for its backend's `IommuMemory`.
    ///
    /// # Errors
    /// [`DeviceError::UnknownEndpoint`] if `id` is not configured.
    pub fn endpoint_iommu(&self, id: EndpointId) -> Result<EndpointIommu, DeviceError> {
        let index = read(&self.shared.tables)
            .endpoint_index(id)
            .ok_or(DeviceError::UnknownEndpoint(id))?;
        Ok(EndpointIommu {
            shared: Arc::clone(&self.shared),
            index,
            id,
        })
    }

    /// Adds a subscriber for one endpoint. It is first told the endpoint's current
    /// state (identity, or each live mapping), then every change.
    ///
    /// # Errors
    /// [`DeviceError::UnknownEndpoint`] if `id` is not configured.
    pub fn subscribe(
        &self,
        id: EndpointId,
        subscriber: Arc<dyn MappingSubscriber>,
    ) -> Result<(), DeviceError> {
        self.endpoint_iommu(id)?.subscribe(subscriber);
        Ok(())
    }

    /// Sets a callback run whenever a fault event is queued, so the VMM can schedule
    /// [`VirtioIommu::process_eventq`] (for example by writing an eventfd).
    pub fn set_fault_notifier(&self, notifier: Arc<dyn Fn() + Send + Sync>) {
        *write(&self.shared.fault_notifier) = Some(notifier);
    }

    /// Sets a callback run when a parked request's subscribers have settled, so the
    /// VMM can run [`VirtioIommu::process_requestq`] again, which completes it. Runs
    /// on the thread that dropped the last [`Hold`](crate::Hold), which holds no lock
    /// of the device.
    pub fn set_requestq_notifier(&self, notifier: Arc<dyn Fn() + Send + Sync>) {
        *write(&self.shared.requestq_notifier) = Some(notifier);
    }

    /// Device reset: detaches every endpoint, destroys every domain (invalidating every
    /// IOTLB), drops pending faults, forgets negotiated features; `bypass` is kept
    /// (DEV-CFG-3).
    pub fn reset(&mut self) {
        let shared = &*self.shared;
        let mut told = Vec::new();
        write(&shared.tables).reset(&mut |ep, ev| shared.on_event(ep, ev, &mut told));
        Shared::tell_unsettled(&mut told);
        lock(&shared.faults).pending.clear();
        self.parked.clear();
        self.acked_features = 0;
    }

    /// System reset: a device reset, and `bypass` returns to its boot value.
    pub fn system_reset(&mut self) {
        let shared = &*self.shared;
        let mut told = Vec::new();
        write(&shared.tables).system_reset(&mut |ep, ev| shared.on_event(ep, ev, &mut told));
        Shared::tell_unsettled(&mut told);
        lock(&shared.faults).pending.clear();
        self.parked.clear();
        self.acked_features = 0;
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        let tables = read(&self.shared.tables);
        let mut requests = [[0; 9]; 5];
        for (row, counts) in requests.iter_mut().zip(&self.requests) {
            for (c, a) in row.iter_mut().zip(counts) {
                *c = a.load(Ordering::Relaxed);
            }
        }
        Counters {
            requests,
            unparseable: self.unparseable.load(Ordering::Relaxed),
            domains: tables.domain_count(),
            mappings: tables.mapping_count(),
            mapped_bytes: (0..tables.endpoint_count())
                .map(|i| (tables.endpoint_id(i), tables.mapped_bytes(i)))
                .collect(),
            peak_exposure: (0..tables.endpoint_count())
                .map(|i| (tables.endpoint_id(i), tables.peak_exposure(i)))
                .collect(),
            faults_raised: self.shared.faults_raised.load(Ordering::Relaxed),
            faults_delivered: self.faults_delivered.load(Ordering::Relaxed),
            faults_dropped: self.shared.faults_dropped.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            parked_ns: self.parked_ns.load(Ordering::Relaxed),
        }
    }

    /// The domain an endpoint is attached to, if any.
    pub fn endpoint_domain(&self, id: EndpointId) -> Option<DomainId> {
        let tables = read(&self.shared.tables);
        tables
            .endpoint_index(id)
            .and_then(|i| tables.endpoint_domain(i))
    }

    /// Processes every available request on the requestq (queue 0), and completes the
    /// parked requests whose subscribers have settled since. Returns whether the guest
    /// should be interrupted.
    ///
    /// A request is applied to the tables at once. Its subscribers are told after the
    /// tables' lock is dropped; one that must wait for another process takes a
    /// [`Hold`](crate::Hold), and the request is parked, its status written but its
    /// buffer not yet used, while the requests after it go on (virtio-iommu does not
    /// offer `VIRTIO_F_IN_ORDER`). It completes on a later call, after the notifier of
    /// [`VirtioIommu::set_requestq_notifier`] ran.
    ///
    /// # Errors
    /// [`DeviceError::Queue`] if the used ring cannot be written.
    pub fn process_requestq<Q, M>(&mut self, queue: &mut Q, mem: &M) -> Result<bool, DeviceError>
    where
        Q: QueueT,
        M: GuestMemory,
    {
        let mut used = false;
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].2.settled() {
                let (head, len, _, since) = self.parked.swap_remove(i);
                let waited = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.parked_ns.fetch_add(waited, Ordering::Relaxed);
                queue.add_used(mem, head, len)?;
                used = true;
            } else {
                i += 1;
            }
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.handle_request(chain, mem);
            if !self.told.is_empty() {
                let settle = Settle::new(read(&self.shared.requestq_notifier).clone());
                Shared::tell(&mut self.told, &settle);
                if !settle.release() {
                    self.deferred.fetch_add(1, Ordering::Relaxed);
                    self.parked.push((head, len, settle, Instant::now()));
                    continue;
                }
            }
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used && queue.needs_notification(mem)?)
    }

    /// Handles one request chain; returns the used length.
    fn handle_request<M: GuestMemory>(
        &mut self,
        chain: virtio_queue::DescriptorChain<&M>,
        mem: &M,
    ) -> u32 {
        let mut buf = [0u8; MAX_READABLE];
        let mut readable: u64 = 0;
        self.writable.segs.clear();
        self.writable.total = 0;
        for desc in chain {
            if desc.is_write_only() {
                self.writable.segs.push((desc.addr(), desc.len()));
                self.writable.total += u64::from(desc.len());
                continue;
            }
            // Virtio 2.7.4.2: readable descriptors come before writable ones.
            if !self.writable.segs.is_empty() {
                return self.unparseable();
            }
            let off = readable.min(MAX_READABLE as u64) as usize;
            let n = (desc.len() as usize).min(MAX_READABLE - off);
            if n > 0 && mem.read_slice(&mut buf[off..off + n], desc.addr()).is_err() {
                return self.unparseable();
            }
            readable += u64::from(desc.len());
        }
        let got = readable.min(MAX_READABLE as u64) as usize;
        // The tail needs 4 writable bytes; without them the request is unparseable.
        if self.writable.total < TAIL_SIZE as u64 {
            return self.unparseable();
        }
        let req = match decode(&buf[..got]) {
            Ok(r) => Ok(r),
            // DEV-OPS-2: unknown type → no write, used length 0.
            Err(DecodeError::NoHead(_) | DecodeError::UnknownType(_)) => return self.unparseable(),
            Err(DecodeError::Truncated { kind, .. }) => Err(kind),
        };
        let kind = match &req {
            Ok(r) => r.request_type(),
            Err(k) => *k,
        };
        let probe_size = self.probe_buf.len() as u64;
        // The response layout (virtio v1.3 §5.13.6, §5.13.6.7; its length is the one
        // Linux's `__viommu_sync_req()` expects): the tail at offset 0, or for PROBE the
        // properties then the tail; a PROBE buffer too small for the properties gets
        // S_INVAL (DEV-PRB-7) in its last 4 bytes, zeros before.
        let (resp_len, probe_fits) = match kind {
            RequestType::Probe if self.writable.total >= probe_size + TAIL_SIZE as u64 => {
                (probe_size + TAIL_SIZE as u64, true)
            }
            RequestType::Probe => (self.writable.total.min(u64::from(u32::MAX)), false),
            _ => (TAIL_SIZE as u64, false),
        };
        // Validate where the response goes before changing any state.
        if !self.writable.check(mem, 0, resp_len) {
            return self.unparseable();
        }
        let status = match req {
            Err(_) => Status::Inval,
            Ok(Request::Probe { .. }) if !probe_fits => Status::Inval,
            Ok(r) => {
                let shared = &*self.shared;
                let told = &mut self.told;
                write(&shared.tables).apply(&r, &mut self.probe_buf, &mut |ep, ev| {
                    shared.on_event(ep, ev, told)
                })
            }
        };
        self.requests[kind as usize][status as usize].fetch_add(1, Ordering::Relaxed);
        let tail = [status as u8, 0, 0, 0]; // DEV-OPS-3: tail.reserved zeroed.
        let ok = if kind == RequestType::Probe {
            let props_len = resp_len - TAIL_SIZE as u64;
            let props_ok = if probe_fits && status == Status::Ok {
                self.writable.write_at(mem, 0, &self.probe_buf)
            } else {
                self.write_zeros(mem, props_len)
            };
            props_ok && self.writable.write_at(mem, props_len, &tail)
        } else {
            self.writable.write_at(mem, 0, &tail)
        };
        if !ok {
            // Checked writable above; only a concurrent memory hot-unplug gets here.
            return 0;
        }
        resp_len as u32
    }

    fn write_zeros<M: GuestMemory>(&self, mem: &M, len: u64) -> bool {
        const ZEROS: [u8; 256] = [0; 256];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(ZEROS.len() as u64);
            if !self.writable.write_at(mem, off, &ZEROS[..n as usize]) {
                return false;
            }
            off += n;
        }
        true
    }

    fn unparseable(&self) -> u32 {
        self.unparseable.fetch_add(1, Ordering::Relaxed);
        0
    }

    /// Number of fault events waiting for an eventq buffer.
    pub fn pending_faults(&self) -> usize {
        lock(&self.shared.faults).pending.len()
    }

    /// Delivers pending fault events, one per eventq (queue 1) buffer. With no buffer
    /// posted, pending events are dropped and counted; a buffer smaller than 24 bytes
    /// is returned unused and its event dropped (DEV-FLT-4: never split). Returns
    /// whether the guest should be interrupted.
    ///
    /// # Errors
    /// [`DeviceError::Queue`] if the used ring cannot be written.
    pub fn process_eventq<Q, M>(&mut self, queue: &mut Q, mem: &M) -> Result<bool, DeviceError>
    where
        Q: QueueT,
        M: GuestMemory,
    {
        let mut used = false;
        loop {
            let Some(ev) = lock(&self.shared.faults).pending.pop_front() else {
                break;
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                let mut q = lock(&self.shared.faults);
                let n = q.pending.len() as u64 + 1;
                q.pending.clear();
                self.shared.faults_dropped.fetch_add(n, Ordering::Relaxed);
                break;
            };
            let head = chain.head_index();
            self.writable.segs.clear();
            self.writable.total = 0;
            for d in chain.writable() {
                self.writable.segs.push((d.addr(), d.len()));
                self.writable.total += u64::from(d.len());
            }
            let bytes = ev.as_bytes();
            let len = if self.writable.total >= bytes.len() as u64
                && self.writable.check(mem, 0, bytes.len() as u64)
                && self.writable.write_at(mem, 0, bytes)
            {
                self.faults_delivered.fetch_add(1, Ordering::Relaxed);
                bytes.len() as u32
            } else {
                self.shared.faults_dropped.fetch_add(1, Ordering::Relaxed);
                0
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used && queue.needs_notification(mem)?)
    }
}
