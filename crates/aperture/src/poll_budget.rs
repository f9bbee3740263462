//! `--poll-cpus` and `--poll-budget`: the CPUs every Aperture poller of this user may
//! take at once, across `serve`, `backend` and `bench --guest` (see
//! [`virtio_contract::PollBudget`]).

use std::path::PathBuf;
use std::time::Duration;
use virtio_contract::{PollBudget, PollConfig, MAX_POLL_CPUS};

/// The options, as `serve`, `backend` and `bench` take them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BudgetArgs {
    /// How many of this user's Aperture pollers (the device host's, each back-end's)
    /// may poll at once, machine-wide; a poller that finds them all polling waits for
    /// its doorbell instead. Default: the CPUs this process may run on, less one for
    /// the guest's vCPU (at least 1). Polling never decides correctness, only how
    /// often a doorbell's wake-up is paid.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=MAX_POLL_CPUS as i64))]
    pub poll_cpus: Option<u32>,
    /// The file the processes share the --poll-cpus turns through (created, mode 0600;
    /// it must be a regular file this user owns). Default: /dev/shm/aperture-poll.UID;
    /// if that cannot be used, a warning names why and this process polls within a
    /// budget of its own.
    #[arg(long, value_name = "FILE")]
    pub poll_budget: Option<PathBuf>,
}

/// `--poll-cpus`'s default: the CPUs left beside one vCPU.
pub fn default_cpus() -> usize {
    let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    n.saturating_sub(1).clamp(1, MAX_POLL_CPUS)
}

/// `--poll-budget`'s default.
pub fn default_path() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    PathBuf::from(format!("/dev/shm/aperture-poll.{uid}"))
}

impl BudgetArgs {
    /// The CPUs asked for, or the default.
    pub fn cpus(&self) -> usize {
        self.poll_cpus.map_or_else(default_cpus, |n| n as usize)
    }

    /// The budget these options name, with the window's maximum. An explicit
    /// `--poll-budget` that cannot be used is an error (its message names the file);
    /// the default file falls back to a budget of this process's own, with a warning
    /// on stderr naming `prog`.
    pub fn config(&self, prog: &str, max: Duration) -> Result<PollConfig, String> {
        let cpus = self.cpus();
        let budget = match &self.poll_budget {
            Some(path) => {
                PollBudget::open(path, cpus).map_err(|e| format!("--poll-budget: {e}"))?
            }
            None => PollBudget::open(&default_path(), cpus).or_else(|e| {
                eprintln!("{prog}: warning: {e}; polling within a budget of this process only");
                PollBudget::local(cpus).map_err(|e| e.to_string())
            })?,
        };
        Ok(PollConfig { max, budget })
    }

    /// The same options as command-line arguments, for a child process (a back-end
    /// `bench` starts), which then shares the budget.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec!["--poll-cpus".to_string(), self.cpus().to_string()];
        if let Some(path) = &self.poll_budget {
            v.push("--poll-budget".into());
            v.push(path.display().to_string());
        }
        v
    }
}
