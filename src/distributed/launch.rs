//! Multi-process launches: reading the torchrun / SLURM environment, the process's device, and
//! the one [`ProcessGroup`] of this process.
//!
//! One process per device, as torchrun and `srun` start them: `WORLD_SIZE` processes, global
//! rank `RANK`, each on device `cuda:LOCAL_RANK` (or the CPU). Inside a process the in-process
//! worker threads of `run.devices` are not used; a process is one rank. The rendezvous happens
//! once per process, before the first training stage, and its connections serve every stage.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::process::{ProcessGroup, Rendezvous};
use crate::device::{DeviceList, DeviceSpec};

/// A launch environment or device request a multi-process launch cannot mean.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The launcher's variables (`WORLD_SIZE`, `RANK`, `MASTER_ADDR`...), named in the message.
    #[error("{0}")]
    Environment(String),
    /// `run.device` / `run.devices` against the launch.
    #[error("{0}")]
    Device(String),
}

/// torchrun's default port, also used under SLURM when `MASTER_PORT` is unset.
pub const DEFAULT_PORT: u16 = 29500;

/// Who this process is in a multi-process launch, as its environment says.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// `host:port` of rank 0.
    pub master: String,
    /// "torchrun" or "SLURM": where the numbers came from (for messages).
    pub source: &'static str,
}

/// Reads the launch from an environment (`get` is `std::env::var` in the binary): `None` for a
/// single process (no `WORLD_SIZE`, or `WORLD_SIZE=1`, and no multi-task SLURM step).
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>, LaunchError> {
    from_env_text(get).map_err(LaunchError::Environment)
}

fn from_env_text(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>, String> {
    let num = |key: &str, source: &str| -> Result<Option<usize>, String> {
        match get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                format!("{key}={v:?} (set by {source}) is not a non-negative integer")
            }),
        }
    };
    let (source, world, rank, local_rank, default_port) = if get("WORLD_SIZE").is_some() {
        let world = num("WORLD_SIZE", "the launcher")?.unwrap_or(1);
        if world == 0 {
            return Err(
                "WORLD_SIZE=0 (set by the launcher) is not a number of processes: it must be at \
                 least 1 (unset it to train in one process)"
                    .to_string(),
            );
        }
        if world == 1 {
            return Ok(None);
        }
        let rank = num("RANK", "the launcher")?.ok_or_else(|| {
            format!(
                "WORLD_SIZE={world} is set but RANK is not: a multi-process launch (torchrun \
                 style) needs WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT"
            )
        })?;
        let local = num("LOCAL_RANK", "the launcher")?.unwrap_or(0);
        if rank >= world {
            return Err(format!(
                "RANK={rank} is not below WORLD_SIZE={world} (set by the launcher): ranks are \
                 0..{}",
                world - 1
            ));
        }
        ("torchrun", world, rank, local, None)
    } else if let Some(world) = num("SLURM_NTASKS", "SLURM")?.filter(|&n| n > 1) {
        let rank = num("SLURM_PROCID", "SLURM")?.ok_or_else(|| {
            "SLURM_NTASKS is set but SLURM_PROCID is not: start the processes with srun".to_string()
        })?;
        let local = num("SLURM_LOCALID", "SLURM")?.unwrap_or(0);
        if rank >= world {
            return Err(format!(
                "SLURM_PROCID={rank} is not below SLURM_NTASKS={world} (set by SLURM)"
            ));
        }
        ("SLURM", world, rank, local, Some(DEFAULT_PORT))
    } else {
        return Ok(None);
    };
    let addr = get("MASTER_ADDR")
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| {
            let hint = if source == "SLURM" {
                " (in the batch script: export MASTER_ADDR=$(scontrol show hostnames \
             \"$SLURM_JOB_NODELIST\" | head -n 1))"
            } else {
                ""
            };
            format!(
                "a {world}-process launch ({source}) needs MASTER_ADDR, the address of rank 0's \
             machine{hint}"
            )
        })?;
    let port = match (get("MASTER_PORT"), default_port) {
        (Some(p), _) => p
            .trim()
            .parse::<u16>()
            .map_err(|_| format!("MASTER_PORT={p:?} is not a port number"))?,
        (None, Some(p)) => p,
        (None, None) => {
            return Err(format!(
                "a {world}-process launch needs MASTER_PORT (torchrun sets it; {DEFAULT_PORT} \
                 is its default)"
            ));
        }
    };
    let master = if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{port}") // IPv6
    } else {
        format!("{addr}:{port}")
    };
    Ok(Some(LaunchEnv {
        rank,
        world,
        local_rank,
        master,
        source,
    }))
}

impl LaunchEnv {
    /// This process's device for a config asking for `device` (`run.device`) and maybe
    /// `devices` (`run.devices`): `cuda:LOCAL_RANK` for CUDA, the CPU otherwise. Refuses what a
    /// launch cannot mean.
    pub fn device_for(
        &self,
        device: &str,
        devices: Option<&DeviceList>,
    ) -> Result<String, LaunchError> {
        self.device_text(device, devices)
            .map_err(LaunchError::Device)
    }

    fn device_text(&self, device: &str, devices: Option<&DeviceList>) -> Result<String, String> {
        if let Some(list) = devices {
            return Err(format!(
                "run.devices = {list} with a {}-process launch ({}): each process trains on \
                 one device (cuda:LOCAL_RANK). Remove run.devices and set run.device = \"cuda\" \
                 (or \"cpu\")",
                self.world, self.source
            ));
        }
        let spec = DeviceSpec::parse(device).map_err(|e| format!("run.device: {e}"))?;
        match spec {
            DeviceSpec::Cuda(i) if device != "cuda" && i != self.local_rank => Err(format!(
                "run.device = {:?} but this process has LOCAL_RANK={}: in a multi-process launch \
                 each process takes cuda:LOCAL_RANK; set run.device = \"cuda\"",
                device, self.local_rank
            )),
            DeviceSpec::Cuda(_) => Ok(format!("cuda:{}", self.local_rank)),
            DeviceSpec::Cpu(_) => {
                // The CPU engine sends gradients over TCP: a test engine, kept on one machine.
                let host = self
                    .master
                    .rsplit_once(':')
                    .map(|h| h.0)
                    .unwrap_or(&self.master);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if loopback {
                    Ok("cpu".into())
                } else {
                    Err(format!(
                        "a multi-process launch on the CPU needs a loopback MASTER_ADDR \
                         (127.0.0.1); got {host}. Several processes on the CPU are a test of the \
                         multi-process path, not a way to train across machines: use CUDA \
                         devices (NCCL) for that"
                    ))
                }
            }
        }
    }
}

/// The launch this process joined, and its group.
static JOINED: OnceLock<(LaunchEnv, Arc<ProcessGroup>)> = OnceLock::new();

/// This process's group when it is part of a multi-process launch that has met.
pub fn current() -> Option<Arc<ProcessGroup>> {
    JOINED.get().map(|(_, g)| g.clone())
}

/// The launch environment this process joined with (`None` outside a launch).
pub fn joined() -> Option<&'static LaunchEnv> {
    JOINED.get().map(|(env, _)| env)
}

/// Meets the other processes of the launch (once per process). `config` is the resolved config
/// as loaded (`Config::to_toml`), which every process must share; `timeout` bounds the wait here
/// and at every collective; `cuda` asks rank 0 for an NCCL id.
pub fn join(
    env: &LaunchEnv,
    config: &str,
    timeout: Duration,
    cuda: bool,
) -> Result<Arc<ProcessGroup>, super::process::RendezvousError> {
    if let Some(g) = current() {
        return Ok(g);
    }
    let rv = Rendezvous {
        rank: env.rank,
        world: env.world,
        master: env.master.clone(),
        timeout,
    };
    let group = ProcessGroup::rendezvous(&rv, config, || {
        if cuda {
            super::nccl::mint_id()
        } else {
            Ok(Vec::new())
        }
    })?;
    Ok(JOINED.get_or_init(|| (env.clone(), group)).1.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>, String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_env(|k| map.get(k).cloned()).map_err(|e| e.to_string())
    }

    #[test]
    fn torchrun_and_slurm_environments() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let l = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank), (3, 4, 1));
        assert_eq!(
            (l.master.as_str(), l.source),
            ("10.0.0.1:29400", "torchrun")
        );
        let s = env(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "node01"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.world, s.local_rank), (5, 8, 1));
        assert_eq!((s.master.as_str(), s.source), ("node01:29500", "SLURM"));
        // A single-task SLURM job is a single process.
        assert_eq!(
            env(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")]).unwrap(),
            None
        );
    }

    #[test]
    fn incomplete_environments_are_named() {
        let e = env(&[
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert!(e.contains("RANK is not"), "{e}");
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.contains("needs MASTER_ADDR"), "{e}");
        let e = env(&[("SLURM_NTASKS", "2"), ("SLURM_PROCID", "1")]).unwrap_err();
        assert!(e.contains("scontrol show hostnames"), "{e}");
        let e = env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let e = env(&[("WORLD_SIZE", "0")]).unwrap_err();
        assert!(e.contains("WORLD_SIZE=0"), "{e}");
        let e = env(&[("WORLD_SIZE", "x")]).unwrap_err();
        assert!(e.contains("WORLD_SIZE=\"x\""), "{e}");
    }

    #[test]
    fn each_process_takes_its_local_device() {
        let l = LaunchEnv {
            rank: 3,
            world: 4,
            local_rank: 1,
            master: "10.0.0.1:29500".into(),
            source: "torchrun",
        };
        assert_eq!(l.device_for("cuda", None).unwrap(), "cuda:1");
        assert!(
            l.device_for("cuda:0", None)
                .unwrap_err()
                .to_string()
                .contains("LOCAL_RANK=1")
        );
        assert!(
            l.device_for("cpu", None)
                .unwrap_err()
                .to_string()
                .contains("loopback")
        );
        let local = LaunchEnv {
            master: "127.0.0.1:29500".into(),
            ..l.clone()
        };
        assert_eq!(local.device_for("cpu", None).unwrap(), "cpu");
        let all = DeviceList::Keyword("all".into());
        assert!(
            local
                .device_for("cpu", Some(&all))
                .unwrap_err()
                .to_string()
                .contains("Remove run.devices")
        );
    }
}
