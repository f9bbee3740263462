//! The errors of the sharing modes and of the out-of-process runner, which are long
//! because they say exactly which buffer, request or backend step failed.

use crate::ring::RingError;
use crate::run::{Pattern, RunError};
use crate::Mode;
use bounce_pool::RamError;
use device_host::vhost_user::VhostUserError;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;
use virtio_iommu::{Request, Status};
use vm_memory::mmap::FromRangesError;
use vm_memory::GuestMemoryError;

/// Why a sharing mode could not be set up, or refused to map or unmap a buffer.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    /// The guest's RAM could not be allocated.
    #[error("guest RAM: {0}")]
    GuestRam(#[source] FromRangesError),
    /// The shadow ring's memory could not be made (implicit grants).
    #[error("the shadow ring's memory: {0}")]
    ShadowMemory(#[source] std::io::Error),
    /// The device's queue on the shadow ring could not be set up.
    #[error("the device's queue on the shadow ring: {0:?}")]
    ShadowQueue(virtio_queue::Error),
    /// The shadow refused a chain or a completion.
    #[error("the shadow ring: {0}")]
    Shadow(#[source] inflight::ShadowError),
    /// The virtio-iommu refused its configuration.
    #[error("creating the virtio-iommu: {0}")]
    IommuDevice(#[source] virtio_iommu::DeviceError),
    /// The virtio-iommu has no translation for the device's endpoint.
    #[error("the device's translation: {source}")]
    Endpoint {
        /// The endpoint ID.
        endpoint: u32,
        /// What the device reported.
        #[source]
        source: virtio_iommu::DeviceError,
    },
    /// The virtio-iommu failed while serving a batch of requests.
    #[error("serving {requests} virtio-iommu requests: {source}")]
    RequestQueue {
        /// Requests in the batch.
        requests: usize,
        /// What the device reported.
        #[source]
        source: virtio_iommu::DeviceError,
    },
    /// The virtio-iommu answered a request sent on its own with a status other than OK.
    #[error("{what}: {status:?}")]
    Refused {
        /// What the request was for (`ATTACH`, `MAP`, `UNMAP`, `MAP (identity)`).
        what: &'static str,
        /// The request.
        request: Request,
        /// Its status.
        status: Status,
    },
    /// Fewer requests of a batch completed than were sent.
    #[error("{done} of {sent} requests completed")]
    Incomplete {
        /// Requests completed.
        done: usize,
        /// Requests sent.
        sent: usize,
    },
    /// A request of a batch was answered with a status other than OK (or none).
    #[error("{request:?}: {status:?}")]
    BatchRefused {
        /// The request.
        request: Request,
        /// Its status, `None` if it was not answered.
        status: Option<Status>,
    },
    /// The restricted pool could not be built at [`POOL_GPA`](crate::modes::POOL_GPA).
    #[error("the restricted pool: {0}")]
    Pool(#[source] bounce_pool::PoolError),
    /// The ring could not be allocated from the pool.
    #[error("the ring's coherent allocation from the pool: {0}")]
    PoolRing(#[source] bounce_pool::DmaError),
    /// The pool's device window could not be built.
    #[error("the pool's device window: {0}")]
    PoolWindow(#[source] bounce_pool::PoolIommuError),
    /// A buffer could not be bounced through the pool.
    #[error("bouncing {len} bytes at {gpa:#x}: {source}")]
    Bounce {
        /// The buffer's guest-physical address.
        gpa: u64,
        /// Its length.
        len: usize,
        /// What the pool's DMA API reported.
        #[source]
        source: bounce_pool::DmaError,
    },
    /// A bounced buffer could not be unmapped.
    #[error("unmapping {len} bounced bytes at {addr:#x}: {source}")]
    Unbounce {
        /// The buffer's address in the pool.
        addr: u64,
        /// Its length.
        len: usize,
        /// What the pool's DMA API reported.
        #[source]
        source: bounce_pool::DmaError,
    },
    /// A Xen domain of the grant modes could not be created.
    #[error("creating domain {dom}: {source}")]
    Domain {
        /// The domain.
        dom: grant_table::DomId,
        /// What Xen reported.
        #[source]
        source: grant_table::GrantError,
    },
    /// The backend domain's RAM could not be allocated.
    #[error("backend RAM: {0}")]
    BackendRam(#[source] FromRangesError),
    /// The guest's grant table could not be set up.
    #[error("the guest's grant table: {0}")]
    GrantTable(#[source] grant_table::GuestError),
    /// The persistent grant pool could not be granted.
    #[error("granting the persistent pool: {0}")]
    PersistentPool(#[source] grant_table::DmaError),
    /// The ring could not be granted.
    #[error("granting the ring: {0}")]
    GrantRing(#[source] grant_table::DmaError),
    /// The backend's grant translation could not be built or could not map the ring.
    #[error("the backend's grant mappings ({what}): {source}")]
    GrantIommu {
        /// The step that failed.
        what: &'static str,
        /// What the backend's grant IOMMU reported.
        #[source]
        source: grant_table::GrantIommuError,
    },
    /// A buffer could not be granted.
    #[error("granting {len} bytes at {gpa:#x}: {source}")]
    Grant {
        /// The buffer's guest-physical address.
        gpa: u64,
        /// Its length.
        len: usize,
        /// What the guest's grant DMA API reported.
        #[source]
        source: grant_table::DmaError,
    },
    /// A buffer's grants could not be revoked.
    #[error("revoking the grants of {len} bytes at {addr:#x}: {source}")]
    Ungrant {
        /// The buffer's grant address.
        addr: u64,
        /// Its length.
        len: usize,
        /// What the guest's grant DMA API reported.
        #[source]
        source: grant_table::DmaError,
    },
}

/// Why an out-of-process cell failed: the cell has no out-of-process backend, the
/// backend could not be started, connected or waited for, or its figures are wrong.
/// Messages that involve the backend process end with the tail of its log.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// `mode` × `pattern` has no out-of-process cell ([`not_measured`](crate::remote::not_measured)).
    #[error(
        "{} {} out of process: not measured: {why}",
        .mode.name(),
        .pattern.name()
    )]
    NotMeasured {
        /// The mode.
        mode: Mode,
        /// The pattern.
        pattern: Pattern,
        /// Why ([`not_measured`](crate::remote::not_measured)'s reason).
        why: &'static str,
    },
    /// `mode` has no out-of-process runner.
    #[error("{}: not measured out of process", .mode.name())]
    NoRunner {
        /// The mode.
        mode: Mode,
    },
    /// The file-backed guest RAM could not be built.
    #[error("file-backed guest RAM: {0}")]
    SplitRam(#[source] RamError),
    /// The pool's memfd could not be duplicated for the memory table.
    #[error("pool memfd: {0}")]
    PoolMemfd(#[source] std::io::Error),
    /// The pool's file could not be mapped as the memory table.
    #[error("the pool's memory table: {0}")]
    PoolTable(#[source] RamError),
    /// The sharing mode could not be set up.
    #[error(transparent)]
    Mode(#[from] ModeError),
    /// `auto` built without its virtio-iommu endpoint.
    #[error("auto has no IOMMU endpoint")]
    NoEndpoint,
    /// The backend's working directory could not be created.
    #[error("cannot create {}: {source}", .path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// What the file system reported.
        #[source]
        source: std::io::Error,
    },
    /// The backend's log could not be created.
    #[error("cannot create the backend log in {}: {source}", .dir.display())]
    Log {
        /// The working directory.
        dir: PathBuf,
        /// What the file system reported.
        #[source]
        source: std::io::Error,
    },
    /// The backend program could not be run.
    #[error("cannot run the backend {}: {source}", .program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// The backend's process id does not fit a `pid_t`.
    #[error("process id {pid} out of range")]
    PidOutOfRange {
        /// The process id.
        pid: u32,
    },
    /// The kernel refused the backend process's CPU clock.
    #[error("cannot get the CPU clock of process {pid}: {source}")]
    CpuClock {
        /// The process id.
        pid: u32,
        /// What the kernel reported.
        #[source]
        source: std::io::Error,
    },
    /// The backend's CPU clock could no longer be read (it exited).
    #[error("cannot read the CPU clock of the backend (pid {pid})")]
    BackendClock {
        /// The backend's process id.
        pid: u32,
    },
    /// The backend exited before it accepted the front-end's connection.
    #[error("the backend exited ({status}) before accepting a connection; {log}")]
    ExitedEarly {
        /// How it exited.
        status: ExitStatus,
        /// The tail of its log.
        log: String,
    },
    /// The front-end could not connect to the backend.
    #[error("{source}; {log}")]
    Connect {
        /// What the front-end reported.
        #[source]
        source: VhostUserError,
        /// The tail of the backend's log.
        log: String,
    },
    /// The backend did not listen on its socket in time.
    #[error(
        "the backend did not listen on {} within {timeout:?}; {log}",
        .socket.display()
    )]
    NotListening {
        /// The socket.
        socket: PathBuf,
        /// How long the front-end waited.
        timeout: Duration,
        /// The tail of the backend's log.
        log: String,
    },
    /// The front-end could not set up implicit grants.
    #[error("setting up implicit grants in front of the backend: {0}")]
    Inflight(#[source] VhostUserError),
    /// The front-end could not be put behind the virtio-iommu.
    #[error("attaching the vhost-user device to the virtio-iommu: {0}")]
    AttachIommu(#[source] VhostUserError),
    /// The backend does not offer the features the cell needs.
    #[error("the backend offers features {offered:#x}, without all of {want:#x}")]
    Features {
        /// Features offered.
        offered: u64,
        /// Features needed.
        want: u64,
    },
    /// The device's queue could not be programmed.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The front-end could not activate the device.
    #[error("activating the vhost-user device: {0}")]
    Activate(#[source] virtio_contract::DeviceError),
    /// The front-end was already disconnected.
    #[error("the vhost-user device is gone")]
    DeviceGone,
    /// The used index could not be read from guest memory.
    #[error("used index: {0}")]
    UsedIndex(#[source] GuestMemoryError),
    /// The front-end failed to kick the backend.
    #[error("kicking the backend: {0}")]
    Kick(#[source] virtio_contract::DeviceError),
    /// The backend did not return a request's chain in time.
    #[error(
        "the backend did not complete the request within {timeout:?}{}; {log}",
        if *.broken { " (the vhost-user connection broke)" } else { "" }
    )]
    Incomplete {
        /// How long the driver waited.
        timeout: Duration,
        /// The vhost-user connection broke.
        broken: bool,
        /// The tail of the backend's log.
        log: String,
    },
    /// The cell was finished without its timed part marked.
    #[error("the timed part was never marked")]
    NotMarked,
    /// The front-end refused IOTLB misses or had invalidates unacknowledged.
    #[error(
        "the front-end refused {refused} misses and {invalidate_failures} invalidates were not acknowledged"
    )]
    FrontEnd {
        /// Misses refused.
        refused: u64,
        /// Invalidates not acknowledged.
        invalidate_failures: u64,
    },
    /// The backend did not exit after the front-end disconnected.
    #[error("the backend did not exit within {timeout:?} after the front-end left; {log}")]
    NoExit {
        /// How long the front-end waited.
        timeout: Duration,
        /// The tail of the backend's log.
        log: String,
    },
    /// Waiting for the backend process failed.
    #[error("waiting for the backend: {0}")]
    Wait(#[source] std::io::Error),
    /// The backend exited unsuccessfully.
    #[error("the backend exited with {status}; {log}")]
    Exit {
        /// How it exited.
        status: ExitStatus,
        /// The tail of its log.
        log: String,
    },
    /// The backend's stats file could not be read.
    #[error("the backend's stats {}: {source}", .path.display())]
    StatsFile {
        /// The file.
        path: PathBuf,
        /// What the file system reported.
        #[source]
        source: std::io::Error,
    },
    /// The backend's stats file is not JSON.
    #[error("the backend's stats {}: {source}", .path.display())]
    StatsJson {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        #[source]
        source: serde_json::Error,
    },
    /// The backend's stats lack a figure.
    #[error("the backend's stats {} lack {field}", .path.display())]
    StatsField {
        /// The file.
        path: PathBuf,
        /// The missing figure.
        field: &'static str,
    },
    /// The device's own counters do not show every request served and none refused.
    #[error(
        "the backend's counters {counters} do not show {served} requests served, none refused"
    )]
    Unserved {
        /// The pattern.
        pattern: Pattern,
        /// The counters (`--stats` `requests`).
        counters: serde_json::Value,
        /// Requests the driver had completed.
        served: u64,
    },
    /// The cell failed while running with the backend connected.
    #[error(transparent)]
    Cell(Box<RunError>),
}

impl From<RunError> for RemoteError {
    /// A cell's failure: the backend's or the mode's own error as it is, anything else
    /// boxed.
    fn from(e: RunError) -> Self {
        match e {
            RunError::Remote(e) => e,
            RunError::Mode(e) => Self::Mode(e),
            RunError::Ring(e) => Self::Ring(e),
            e => Self::Cell(Box::new(e)),
        }
    }
}
