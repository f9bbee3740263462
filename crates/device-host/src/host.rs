//! `aperture serve`: lays out the PCI functions (the virtio-iommu and its endpoints),
//! binds one vfio-user socket per function, writes the VIOT table and the QEMU
//! arguments, then serves every function on its own thread until the VMM goes away.

use crate::iommu_device::IommuPciDevice;
use crate::poll::{PollHandle, Pollable, Poller};
use crate::vfio::{
    irqs, regions, EventFdSink, MemoryBuilder, MsixVectors, NotifyHook, PciFunction,
};
use crate::viot::{build_viot, EndpointRange};
use bounce_pool::{Gpa, PoolIommu};
use dma_types::lock;
use mem_layout::{Bdf, Layout, LayoutConfig, LayoutError, RdmDatabase};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vfio_user::{Server, ServerBackend};
use virtio_contract::{PollConfig, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM};
use virtio_iommu::{
    EndpointConfig, EndpointIommu, IommuConfig, Iova, ReservedRegion, ResvKind, VirtioIommu,
};
use virtio_pci::VirtioPciTransport;
use vm_memory::{GuestMemoryMmap, IommuMemory};

/// Memory of an endpoint behind the virtio-iommu: guest-physical memory seen through
/// the endpoint's translation.
pub type EndpointMemory = IommuMemory<GuestMemoryMmap, EndpointIommu>;

/// Memory of a device in pool mode: guest-physical memory seen through
/// [`PoolIommu`], which translates the restricted DMA pool's range and refuses every
/// other address (the request that names one fails; the device does not panic).
pub type PoolMemory = IommuMemory<GuestMemoryMmap, PoolIommu>;

/// Pool mode (issue 17): the restricted DMA pool every device of the VM is limited
/// to, where the guest's device tree places it (`aperture dt-pool`). The guest
/// bounces all of a device's DMA through it, vrings included, once the device offers
/// `VIRTIO_F_ACCESS_PLATFORM`, which pool-mode devices do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolWindow {
    /// Guest-physical base of the pool.
    pub base: Gpa,
    /// Its size in bytes.
    pub size: u64,
}

/// How the virtio-iommu is presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuMode {
    /// Endpoints behind our virtio-iommu; `bypass` boots as 0: nothing is reachable
    /// until the guest maps it.
    On,
    /// No virtio-iommu: endpoints reach all guest RAM.
    Off,
    /// Present, `bypass` boots as 1: unattached endpoints reach all RAM.
    Bypass,
}

/// PCI slot of the virtio-iommu on bus 0; endpoints take the slots after it.
pub const IOMMU_SLOT: u8 = 0x10;
/// Slots after the IOMMU's on bus 0 (0x11..=0x1f).
pub const MAX_ENDPOINTS: usize = 0x1f - IOMMU_SLOT as usize;

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// More endpoints than free slots.
    #[error("{0} devices requested; at most {MAX_ENDPOINTS} fit on bus 0 after the IOMMU")]
    TooManyDevices(usize),
    /// The directory could not be prepared.
    #[error("cannot use directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A socket could not be bound.
    #[error("cannot listen on {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: vfio_user::Error,
    },
    /// A device could not be built.
    #[error("device {name}: {source}")]
    Device {
        /// Device name.
        name: String,
        /// Why.
        #[source]
        source: BuildError,
    },
    /// The VIOT could not be built.
    #[error("VIOT: {0}")]
    Viot(#[from] crate::viot::ViotError),
    /// Pool mode: the pool is not the last bytes of RAM, so RAM cannot be split into
    /// two files at it.
    #[error(
        "the pool at {base:#x} of {size:#x} bytes does not end RAM ({ram:#x} bytes at \
         {ram_start:#x}): pool mode puts it in a memory file of its own, the last one"
    )]
    PoolNotAtTop {
        /// The pool's base.
        base: u64,
        /// Its size.
        size: u64,
        /// Where RAM starts.
        ram_start: u64,
        /// RAM size.
        ram: u64,
    },
}

/// Why a device, or a thread serving it, could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The virtio-pci transport refused the device's shape.
    #[error(transparent)]
    Transport(#[from] virtio_pci::TransportError),
    /// The disk image.
    #[error(transparent)]
    Block(#[from] virtio_devices::BlockError),
    /// The entropy source.
    #[error(transparent)]
    Rng(#[from] virtio_devices::RngError),
    /// The vhost-user back-end.
    #[error(transparent)]
    VhostUser(#[from] crate::vhost_user::VhostUserError),
    /// The virtio-iommu's configuration.
    #[error(transparent)]
    Iommu(#[from] virtio_iommu::DeviceError),
    /// The pool window of pool mode.
    #[error(transparent)]
    Pool(#[from] bounce_pool::PoolIommuError),
    /// The device cannot be served in pool mode.
    #[error("{0} cannot be served in pool mode")]
    NoPoolMode(String),
    /// A thread could not be started.
    #[error("cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why a function's server ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The vfio-user connection failed.
    #[error(transparent)]
    Protocol(#[from] vfio_user::Error),
    /// Its thread could not be started.
    #[error("cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A PCI function ready to serve.
pub struct Function {
    /// What its server thread runs.
    pub backend: Box<dyn ServerBackend + Send>,
    /// Its MSI-X vector count.
    pub vectors: u16,
    /// Its transport, for the poller and for its counters.
    pub transport: Arc<dyn Pollable>,
}

/// A device the host puts behind the IOMMU, as a factory so the host can build it
/// for the memory type the mode needs.
pub trait EndpointFactory: Send {
    /// Short name, used for the socket file (`NAME.sock`).
    fn name(&self) -> String;
    /// Builds and serves the device with memory translated by `iommu` (or identity
    /// when `None`).
    ///
    /// # Errors
    /// [`BuildError`]: why the device could not be built.
    fn build(self: Box<Self>, iommu: Option<EndpointIommu>) -> Result<Function, BuildError>;

    /// Builds and serves the device in pool mode: it offers `VIRTIO_F_ACCESS_PLATFORM`
    /// and reaches guest memory only inside `pool` ([`serve_pool_endpoint`]).
    ///
    /// # Errors
    /// [`BuildError::NoPoolMode`] unless the factory supports pool mode (in-process
    /// virtio-blk and virtio-rng, and vhost-user back-ends without implicit grants
    /// do); else as [`Self::build`].
    fn build_pool(self: Box<Self>, pool: PoolWindow) -> Result<Function, BuildError> {
        let _ = pool;
        Err(BuildError::NoPoolMode(self.name()))
    }
}

/// Serves `device` in pool mode: its memory is [`PoolMemory`] over `pool`, and it
/// must be driven with `VIRTIO_F_ACCESS_PLATFORM` (without it the guest's virtio
/// would skip the DMA API, hence the pool).
///
/// # Errors
/// [`BuildError::Pool`] for an empty or overflowing window; [`BuildError::Transport`].
pub fn serve_pool_endpoint<D>(
    device: D,
    class_code: u32,
    pool: PoolWindow,
) -> Result<Function, BuildError>
where
    D: VirtioDevice<PoolMemory> + Send + 'static,
{
    let iommu = PoolIommu::new(pool.base, pool.size)?;
    let mem = IommuMemory::new(GuestMemoryMmap::default(), iommu, true, ());
    // The window never changes; each new guest-RAM map from the VMM keeps it.
    let template = mem.clone();
    let build: MemoryBuilder<PoolMemory> =
        Box::new(move |phys| template.with_replaced_backend(phys));
    function(
        device,
        class_code,
        mem,
        build,
        1 << VIRTIO_F_ACCESS_PLATFORM,
        Box::new(()),
    )
}

/// Serves `device` as a PCI function, translated by `iommu` when given.
///
/// # Errors
/// [`BuildError::Transport`]: the transport refused the device.
pub fn serve_endpoint<D>(
    device: D,
    class_code: u32,
    iommu: Option<EndpointIommu>,
) -> Result<Function, BuildError>
where
    D: VirtioDevice<GuestMemoryMmap> + VirtioDevice<EndpointMemory> + Send + 'static,
{
    match iommu {
        Some(ep) => {
            let mem = IommuMemory::new(GuestMemoryMmap::default(), ep.clone(), true, ());
            // Each process_queue is one batch of the endpoint (virtio_contract's "The
            // batch"): an UNMAP of what it translated completes after it.
            let batch = Box::new(ep.clone());
            let build: MemoryBuilder<EndpointMemory> =
                Box::new(move |phys| IommuMemory::new(phys, ep.clone(), true, ()));
            function(
                device,
                class_code,
                mem,
                build,
                1 << VIRTIO_F_ACCESS_PLATFORM,
                batch,
            )
        }
        None => {
            let build: MemoryBuilder<GuestMemoryMmap> = Box::new(|phys| phys);
            function(
                device,
                class_code,
                GuestMemoryMmap::default(),
                build,
                0,
                Box::new(()),
            )
        }
    }
}

fn function<D, M>(
    device: D,
    class_code: u32,
    mem: M,
    build: MemoryBuilder<M>,
    required: u64,
    batch: Box<dyn virtio_contract::Batch + Send>,
) -> Result<Function, BuildError>
where
    D: VirtioDevice<M> + Send + 'static,
    M: vm_memory::GuestMemory + Send + 'static,
{
    let n = device.queue_max_sizes().len() as u16 + 1;
    let vectors = MsixVectors::new(n);
    let mut t = VirtioPciTransport::new(
        device,
        class_code,
        mem,
        Box::new(EventFdSink(Arc::clone(&vectors))),
        required,
    )?;
    t.set_batch(batch);
    let vector_count = t.msix_vectors();
    let t = Arc::new(Mutex::new(t));
    Ok(Function {
        backend: Box::new(PciFunction::new(Arc::clone(&t), vectors, build)),
        vectors: vector_count,
        transport: t,
    })
}

struct Served {
    name: String,
    socket: PathBuf,
    slot: u8,
    server: Server,
    backend: Box<dyn ServerBackend + Send>,
}

/// The virtio-iommu's transport, shared with its server thread.
type IommuTransport = Arc<Mutex<VirtioPciTransport<IommuPciDevice, GuestMemoryMmap>>>;

/// A handle on the served virtio-iommu, for reading its counters while or after it
/// serves.
#[derive(Clone)]
pub struct IommuHandle(IommuTransport);

impl IommuHandle {
    /// The device's counters now.
    pub fn counters(&self) -> virtio_iommu::Counters {
        lock(&self.0).device().iommu.counters()
    }

    /// Its transport's counters now: notifications, polled work, interrupts.
    pub fn transport_counters(&self) -> virtio_pci::TransportCounters {
        lock(&self.0).counters()
    }
}

/// The poll window's default maximum (`aperture serve --poll-us`), chosen by measuring
/// the guest (docs/ARCHITECTURE.md, "Polling").
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(256);

/// The functions of one VM, bound and ready to serve.
pub struct DeviceHost {
    dir: PathBuf,
    served: Vec<Served>,
    qemu_args: Vec<String>,
    iommu: Option<IommuHandle>,
    poller: Poller,
}

/// The QEMU arguments that build guest RAM as `layout` plans it, the first arguments
/// of `DIR/qemu-args`: RAM is a shared memfd (vfio-user needs one), and when the plan
/// ends low RAM below where q35 would, `max-ram-below-4g` says where; q35 then puts
/// the rest above 4 GiB, so the guest keeps all of it.
pub fn memory_args(layout: &Layout) -> Vec<String> {
    let ram = layout.ram_size;
    let mut args = vec![
        "-m".to_string(),
        format!("{ram}B"),
        "-object".to_string(),
        format!("memory-backend-memfd,id=aperture-ram,size={ram}B,share=on"),
        "-machine".to_string(),
        "memory-backend=aperture-ram".to_string(),
    ];
    if let Some(low) = layout.max_ram_below_4g() {
        args.push("-machine".to_string());
        args.push(format!("max-ram-below-4g={low}B"));
    }
    args
}

/// Pool mode's QEMU RAM arguments: guest RAM as two shared memfds, the pool its own
/// (issue 17 scope 2), so that the VMM hands the device host the pool as a separate
/// DMA region with its own file, and a vhost-user back-end can be given that file and
/// nothing else ([`crate::vhost_user::VhostUserDevice::share_only`]). The split is
/// made with two NUMA nodes: QEMU places node 0's memory from `ram_start` and node 1's
/// right after it, so the pool must be the last `pool.size` bytes of RAM (where
/// `aperture dt-pool` puts it). A guest kernel without NUMA sees two memory ranges.
///
/// # Errors
/// [`HostError::PoolNotAtTop`] unless `pool` ends exactly at the end of RAM and
/// starts above `ram_start`.
pub fn pool_memory_args(
    layout: &Layout,
    ram_start: Gpa,
    pool: PoolWindow,
) -> Result<Vec<String>, HostError> {
    let ram = layout.ram_size;
    let top = ram_start.0.checked_add(ram);
    let low = pool.base.0.checked_sub(ram_start.0);
    match (top, low) {
        (Some(top), Some(low)) if low > 0 && pool.base.0.checked_add(pool.size) == Some(top) => {
            Ok(vec![
                "-m".to_string(),
                format!("{ram}B"),
                "-object".to_string(),
                format!("memory-backend-memfd,id=aperture-ram,size={low}B,share=on"),
                "-object".to_string(),
                format!(
                    "memory-backend-memfd,id=aperture-pool,size={}B,share=on",
                    pool.size
                ),
                "-numa".to_string(),
                "node,nodeid=0,memdev=aperture-ram".to_string(),
                "-numa".to_string(),
                "node,nodeid=1,memdev=aperture-pool".to_string(),
            ])
        }
        _ => Err(HostError::PoolNotAtTop {
            base: pool.base.0,
            size: pool.size,
            ram_start: ram_start.0,
            ram,
        }),
    }
}

/// The layout of `mem_mib` MiB of RAM with no reserved memory: q35's own split.
///
/// # Errors
/// [`LayoutError`] when the RAM does not fit the guest's physical address width.
pub fn plain_layout(mem_mib: u32) -> Result<Layout, LayoutError> {
    mem_layout::plan(
        &LayoutConfig::new(u64::from(mem_mib) << 20),
        &RdmDatabase::new(),
    )
}

/// Endpoint ID of a function on bus 0 (the VIOT ranges use `endpoint_start = BDF`).
pub fn endpoint_id(slot: u8) -> u32 {
    u32::from(slot) << 3
}

/// PCI slot on bus 0 of the `index`-th endpoint given to [`DeviceHost::new`].
pub fn endpoint_slot(index: usize) -> Option<u8> {
    u8::try_from(index)
        .ok()
        .filter(|&i| usize::from(i) < MAX_ENDPOINTS)
        .map(|i| IOMMU_SLOT + 1 + i)
}

/// Guest address (segment 0, bus 0, function 0) of the function in `slot`.
pub fn slot_bdf(slot: u8) -> Bdf {
    Bdf {
        segment: 0,
        bus: 0,
        device: slot,
        function: 0,
    }
}

/// What an endpoint's PROBE lists besides the MSI window: every region `layout` keeps
/// for the device in `slot`, as `RESV_MEM_T_RESERVED` (virtio-iommu has no subtype for
/// direct-mapped regions: the guest must simply never use these IOVAs).
fn endpoint_config(layout: &Layout, slot: u8) -> EndpointConfig {
    let mut ep = EndpointConfig::new(endpoint_id(slot));
    ep.reserved = layout
        .reserved_for(slot_bdf(slot))
        .into_iter()
        .map(|r| ReservedRegion {
            start: Iova(r.range.start()),
            end: Iova(r.range.end()),
            kind: ResvKind::Reserved,
        })
        .collect();
    ep
}

impl DeviceHost {
    /// Prepares `dir` (created if missing; stale `*.sock` files of ours removed), binds
    /// the sockets, writes `viot.aml` (unless the mode is `Off`) and `qemu-args`.
    ///
    /// `layout` is the single source of truth for guest memory: it gives the RAM
    /// arguments ([`memory_args`]) and each endpoint's reserved regions, which its PROBE
    /// answers list (endpoint `i` is [`slot_bdf`]`(`[`endpoint_slot`]`(i))` in it).
    ///
    /// One [`Poller`] serves every in-process queue, with a window of at most
    /// `poll.max` (`Duration::ZERO`: never poll; [`DEFAULT_POLL_MAX`] otherwise), within
    /// `poll.budget` (a bare `Duration` gives an unlimited budget).
    ///
    /// # Errors
    /// [`HostError`] naming what could not be prepared; sockets bound so far are removed.
    pub fn new(
        dir: &Path,
        mode: IommuMode,
        layout: &Layout,
        endpoints: Vec<Box<dyn EndpointFactory>>,
        poll: impl Into<PollConfig>,
    ) -> Result<Self, HostError> {
        Self::build(dir, mode, layout, endpoints, poll.into(), None)
    }

    /// Pool mode (issue 17): as [`Self::new`] without a virtio-iommu, every endpoint
    /// built with [`EndpointFactory::build_pool`]: it offers `VIRTIO_F_ACCESS_PLATFORM`
    /// and reaches only `pool` of guest memory. Guest RAM (starting at `ram_start`,
    /// `layout.ram_size` bytes) is two memory files split at the pool
    /// ([`pool_memory_args`]). The guest learns of the pool from its
    /// device tree, which the caller provides (and may add to `qemu-args` with
    /// [`Self::add_qemu_args`]).
    ///
    /// # Errors
    /// As [`Self::new`]; [`BuildError::NoPoolMode`] for a device that cannot be
    /// served in pool mode.
    pub fn new_pool(
        dir: &Path,
        layout: &Layout,
        ram_start: Gpa,
        endpoints: Vec<Box<dyn EndpointFactory>>,
        poll: impl Into<PollConfig>,
        pool: PoolWindow,
    ) -> Result<Self, HostError> {
        // Checked before any socket exists.
        pool_memory_args(layout, ram_start, pool)?;
        Self::build(
            dir,
            IommuMode::Off,
            layout,
            endpoints,
            poll.into(),
            Some((pool, ram_start)),
        )
    }

    fn build(
        dir: &Path,
        mode: IommuMode,
        layout: &Layout,
        endpoints: Vec<Box<dyn EndpointFactory>>,
        poll: PollConfig,
        pool: Option<(PoolWindow, Gpa)>,
    ) -> Result<Self, HostError> {
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(HostError::TooManyDevices(endpoints.len()));
        }
        let dir_err = |source| HostError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let poller = Poller::start(poll).map_err(|e| HostError::Device {
            name: "poller".into(),
            source: BuildError::Thread(e),
        })?;
        // Every function's notifications also tell the poller the guest is busy.
        let polled = |backend: Box<dyn ServerBackend + Send>, p: &Poller| {
            let kick = p.handle();
            Box::new(NotifyHook::new(backend, move || kick.kick())) as Box<dyn ServerBackend + Send>
        };
        let mut specs = Vec::new();
        for (i, f) in endpoints.into_iter().enumerate() {
            let slot = endpoint_slot(i).ok_or(HostError::TooManyDevices(i + 1))?;
            specs.push((slot, f));
        }
        let mut served = Vec::new();
        let mut iommu_handles = Vec::new();
        let mut handle = None;
        if mode != IommuMode::Off {
            let config = IommuConfig {
                boot_bypass: mode == IommuMode::Bypass,
                endpoints: specs
                    .iter()
                    .map(|(slot, _)| endpoint_config(layout, *slot))
                    .collect(),
                ..IommuConfig::default()
            };
            let iommu = VirtioIommu::new(&config).map_err(|e| HostError::Device {
                name: "iommu".into(),
                source: e.into(),
            })?;
            for (slot, _) in &specs {
                let ep = iommu
                    .endpoint_iommu(virtio_iommu::EndpointId(endpoint_id(*slot)))
                    .map_err(|e| HostError::Device {
                        name: "iommu".into(),
                        source: e.into(),
                    })?;
                iommu_handles.push(Some(ep));
            }
            let dev = IommuPciDevice::new(iommu);
            let vectors = MsixVectors::new(3);
            let t = VirtioPciTransport::new(
                dev,
                0x00ff_0000,
                GuestMemoryMmap::default(),
                Box::new(EventFdSink(Arc::clone(&vectors))),
                0,
            )
            .map_err(|e| HostError::Device {
                name: "iommu".into(),
                source: e.into(),
            })?;
            let t = Arc::new(Mutex::new(t));
            // A fault raised by an endpoint's access is delivered on the eventq at once,
            // and a request parked for a back-end's ack completes as soon as it is in.
            let kick = |queue: usize| -> Arc<dyn Fn() + Send + Sync> {
                let weak = Arc::downgrade(&t);
                Arc::new(move || {
                    if let Some(t) = weak.upgrade() {
                        lock(&t).serve(queue);
                    }
                })
            };
            {
                let guard = lock(&t);
                let iommu = &guard.device().iommu;
                iommu.set_fault_notifier(kick(1));
                iommu.set_requestq_notifier(kick(0));
            }
            handle = Some(IommuHandle(Arc::clone(&t)));
            poller.add(&(Arc::clone(&t) as Arc<dyn Pollable>));
            let build: MemoryBuilder<GuestMemoryMmap> = Box::new(|phys| phys);
            let backend = Box::new(PciFunction::new(t, vectors, build));
            served.push(bind(dir, "iommu", IOMMU_SLOT, polled(backend, &poller), 3)?);
        } else {
            iommu_handles.resize_with(specs.len(), || None);
        }
        for ((slot, factory), ep) in specs.into_iter().zip(iommu_handles) {
            let name = factory.name();
            let built = match pool {
                Some((p, _)) => factory.build_pool(p),
                None => factory.build(ep),
            };
            let f = built.map_err(|source| HostError::Device {
                name: name.clone(),
                source,
            })?;
            poller.add(&f.transport);
            served.push(bind(
                dir,
                &name,
                slot,
                polled(f.backend, &poller),
                f.vectors,
            )?);
        }
        let mut host = Self {
            dir: dir.to_path_buf(),
            served,
            qemu_args: Vec::new(),
            iommu: handle,
            poller,
        };
        host.write_files(mode, layout, pool)?;
        Ok(host)
    }

    fn write_files(
        &mut self,
        mode: IommuMode,
        layout: &Layout,
        pool: Option<(PoolWindow, Gpa)>,
    ) -> Result<(), HostError> {
        let dir_err = |source| HostError::Dir {
            path: self.dir.clone(),
            source,
        };
        let mut args = match pool {
            Some((p, ram_start)) => pool_memory_args(layout, ram_start, p)?,
            None => memory_args(layout),
        };
        if mode != IommuMode::Off {
            let iommu = slot_bdf(IOMMU_SLOT);
            let ranges: Vec<EndpointRange> = self
                .served
                .iter()
                .filter(|s| s.slot != IOMMU_SLOT)
                .map(|s| {
                    let b = slot_bdf(s.slot);
                    EndpointRange {
                        first: b,
                        last: b,
                        endpoint_start: endpoint_id(s.slot),
                    }
                })
                .collect();
            let viot = build_viot(iommu, &ranges)?;
            let path = self.dir.join("viot.aml");
            std::fs::write(&path, viot).map_err(dir_err)?;
            args.push("-acpitable".into());
            args.push(format!("file={}", path.display()));
        }
        for s in &self.served {
            args.push("-device".into());
            args.push(format!(
                "{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"path\":\"{}\",\"type\":\"unix\"}},\"addr\":\"{:#x}\",\"id\":\"aperture-{}\"}}",
                s.socket.display(),
                s.slot,
                s.name
            ));
        }
        let mut text = args.join("\n");
        text.push('\n');
        std::fs::write(self.dir.join("qemu-args"), text).map_err(dir_err)?;
        self.qemu_args = args;
        Ok(())
    }

    /// Appends `args` to the QEMU arguments and rewrites `DIR/qemu-args`.
    ///
    /// # Errors
    /// [`HostError::Dir`] if the file cannot be written.
    pub fn add_qemu_args(&mut self, args: &[String]) -> Result<(), HostError> {
        self.qemu_args.extend_from_slice(args);
        let mut text = self.qemu_args.join("\n");
        text.push('\n');
        std::fs::write(self.dir.join("qemu-args"), text).map_err(|source| HostError::Dir {
            path: self.dir.clone(),
            source,
        })
    }

    /// The served virtio-iommu, unless the mode is `Off`.
    pub fn iommu(&self) -> Option<IommuHandle> {
        self.iommu.clone()
    }

    /// The poller, for its counters while or after the host serves.
    pub fn poller(&self) -> PollHandle {
        self.poller.handle()
    }

    /// The QEMU arguments written to `DIR/qemu-args`.
    pub fn qemu_args(&self) -> &[String] {
        &self.qemu_args
    }

    /// `(name, socket, PCI slot)` of every function.
    pub fn functions(&self) -> Vec<(String, PathBuf, u8)> {
        self.served
            .iter()
            .map(|s| (s.name.clone(), s.socket.clone(), s.slot))
            .collect()
    }

    /// Serves every function on its own thread. Returns when the VMM has gone away:
    /// as soon as one function's connection ends (QEMU quit or the socket broke), the
    /// others get `grace` to end too; what is still connected then is abandoned (its
    /// thread ends with the process). Returns `(name, result)` per finished function.
    pub fn run(self, grace: Duration) -> Vec<(String, Result<(), ServeError>)> {
        let (tx, rx) = mpsc::channel();
        let total = self.served.len();
        for s in self.served {
            let thread_tx = tx.clone();
            let name = s.name.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("aperture-{name}"))
                .spawn(move || {
                    let Served {
                        name,
                        server,
                        mut backend,
                        ..
                    } = s;
                    let r = server.run(backend.as_mut()).map_err(ServeError::from);
                    // Drop the server (removes its socket) before reporting.
                    drop(server);
                    let _ = thread_tx.send((name, r));
                });
            if let Err(e) = spawned {
                let _ = tx.send((name, Err(ServeError::Thread(e))));
            }
        }
        drop(tx);
        let mut done = Vec::new();
        if let Ok(first) = rx.recv() {
            done.push(first);
        }
        while done.len() < total {
            match rx.recv_timeout(grace) {
                Ok(r) => done.push(r),
                Err(_) => break,
            }
        }
        done
    }
}

fn bind(
    dir: &Path,
    name: &str,
    slot: u8,
    backend: Box<dyn ServerBackend + Send>,
    vectors: u16,
) -> Result<Served, HostError> {
    let socket = dir.join(format!("{name}.sock"));
    // A socket file left by an earlier run is ours to replace; anything else is not.
    if let Ok(meta) = std::fs::symlink_metadata(&socket) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(&socket);
        }
    }
    let server = Server::new(&socket, true, irqs(vectors), regions()).map_err(|source| {
        HostError::Socket {
            path: socket.clone(),
            source,
        }
    })?;
    Ok(Served {
        name: name.to_string(),
        socket,
        slot,
        server,
        backend,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn window(base: u64, size: u64) -> PoolWindow {
        PoolWindow {
            base: Gpa(base),
            size,
        }
    }

    #[test]
    fn pool_mode_splits_ram_at_the_pool_into_two_files() {
        let layout = plain_layout(512).unwrap();
        let args = pool_memory_args(&layout, Gpa(GIB), window(GIB + 496 * MIB, 16 * MIB)).unwrap();
        let text = args.join(" ");
        assert!(text.starts_with(&format!("-m {}B ", 512 * MIB)), "{text}");
        assert!(text.contains(&format!("id=aperture-ram,size={}B,share=on", 496 * MIB)));
        assert!(text.contains(&format!("id=aperture-pool,size={}B,share=on", 16 * MIB)));
        assert!(text.contains("-numa node,nodeid=0,memdev=aperture-ram"));
        assert!(text.contains("-numa node,nodeid=1,memdev=aperture-pool"));
        // One backend for all of RAM would hand the pool over in RAM's file.
        assert!(!text.contains("memory-backend=aperture-ram"));
    }

    #[test]
    fn pool_mode_needs_the_pool_at_the_top_of_ram() {
        let layout = plain_layout(512).unwrap();
        for w in [
            window(GIB + 400 * MIB, 16 * MIB), // below the top
            window(GIB + 504 * MIB, 16 * MIB), // past the end
            window(GIB, 512 * MIB),            // all of RAM: no node 0 left
            window(0, 16 * MIB),               // below RAM
        ] {
            assert!(
                matches!(
                    pool_memory_args(&layout, Gpa(GIB), w),
                    Err(HostError::PoolNotAtTop { .. })
                ),
                "{w:?}"
            );
        }
    }
}
