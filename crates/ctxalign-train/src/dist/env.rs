//! Where a process stands in a distributed run, read from the environment its launcher set —
//! torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or SLURM's
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) — in open_clip's order of precedence
//! (`open_clip_train/distributed.py`: `world_info_from_env`, `is_using_distributed`). Reading only:
//! nothing here writes the environment.

use super::DistError;

/// Who set the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvSource {
    /// torchrun (or any launcher that sets `RANK`/`WORLD_SIZE`, `ctxalign --nproc-per-node` too).
    Torchrun,
    Slurm,
    /// MPI launchers (`PMI_*`, `OMPI_COMM_WORLD_*`).
    Mpi,
}

/// This process's place in a run of several processes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes of this machine: the GPU it uses (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// Where rank 0 listens for the others (the NCCL unique id exchange).
    pub master_addr: String,
    pub master_port: u16,
    pub source: EnvSource,
}

/// torch's default `MASTER_PORT` in its launch scripts.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl DistEnv {
    /// The run described by this process's environment, or `None` when it describes no run of
    /// more than one process (no launcher, or a world of one).
    pub fn from_env() -> Result<Option<Self>, DistError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over any variable source (for tests and embedding apps).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let number =
            |name: &str| -> Result<Option<usize>, DistError> {
                match get(name) {
                    None => Ok(None),
                    Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                        DistError::Environment(format!("{name}={v:?} is not a non-negative whole number"))
                    }),
                }
            };
        // open_clip's `is_using_distributed`: WORLD_SIZE, else SLURM_NTASKS, decides.
        let (world_var, source) = if get("WORLD_SIZE").is_some() {
            ("WORLD_SIZE", EnvSource::Torchrun)
        } else if get("SLURM_NTASKS").is_some() {
            ("SLURM_NTASKS", EnvSource::Slurm)
        } else if get("PMI_SIZE").is_some() {
            ("PMI_SIZE", EnvSource::Mpi)
        } else if get("OMPI_COMM_WORLD_SIZE").is_some() {
            ("OMPI_COMM_WORLD_SIZE", EnvSource::Mpi)
        } else {
            return Ok(None);
        };
        let world_size = number(world_var)?.unwrap_or(1);
        if world_size <= 1 {
            return Ok(None);
        }
        let first = |names: &[&str]| -> Result<Option<(String, usize)>, DistError> {
            for name in names {
                if let Some(v) = number(name)? {
                    return Ok(Some((name.to_string(), v)));
                }
            }
            Ok(None)
        };
        let (rank_var, rank) =
            first(&["RANK", "PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"])?.ok_or_else(|| {
                DistError::Environment(format!(
                "{world_var}={world_size} but no rank is set (RANK, SLURM_PROCID, PMI_RANK or OMPI_COMM_WORLD_RANK)"
            ))
            })?;
        if rank >= world_size {
            return Err(DistError::Environment(format!("{rank_var}={rank} is not a rank of {world_var}={world_size}")));
        }
        let local_rank = first(&["LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"])?
            .map_or(0, |x| x.1);
        let master_addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty()).ok_or_else(|| {
            DistError::Environment(format!(
                "{world_var}={world_size} but MASTER_ADDR is not set: it names the machine of rank 0 (under \
                 SLURM: export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))"
            ))
        })?;
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| DistError::Environment(format!("MASTER_PORT={p:?} is not a port number")))?,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port,
            source,
        }))
    }

    /// The port of ctxalign's rendezvous: `CTXALIGN_MASTER_PORT` when set; else under torchrun,
    /// whose agent keeps its own store on `MASTER_PORT`, the port after it; else `MASTER_PORT`.
    pub fn rendezvous_port(&self, get: impl Fn(&str) -> Option<String>) -> Result<u16, DistError> {
        if let Some(p) = get("CTXALIGN_MASTER_PORT") {
            return p
                .trim()
                .parse()
                .map_err(|_| DistError::Environment(format!("CTXALIGN_MASTER_PORT={p:?} is not a port number")));
        }
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Ok(if agent_store { self.master_port.wrapping_add(1) } else { self.master_port })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, DistError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_and_slurm() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None, "a world of one is no run");
        let t = env(&[
            ("WORLD_SIZE", "16"),
            ("RANK", "9"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            t,
            DistEnv {
                rank: 9,
                world_size: 16,
                local_rank: 1,
                master_addr: "node0".into(),
                master_port: 1234,
                source: EnvSource::Torchrun
            }
        );
        let s = env(&[("SLURM_NTASKS", "8"), ("SLURM_PROCID", "5"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "n1")])
            .unwrap()
            .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank, s.master_port, s.source), (5, 8, 1, 29500, EnvSource::Slurm));
        // torchrun inside a SLURM allocation: torchrun's variables win, as in open_clip.
        let both = env(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("WORLD_SIZE", "8"),
            ("RANK", "3"),
            ("MASTER_ADDR", "h"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((both.rank, both.world_size, both.source), (3, 8, EnvSource::Torchrun));
    }

    #[test]
    fn incomplete_environments_are_named() {
        let err = env(&[("WORLD_SIZE", "2"), ("RANK", "0")]).unwrap_err().to_string();
        assert!(err.contains("MASTER_ADDR is not set") && err.contains("scontrol"), "{err}");
        let err = env(&[("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]).unwrap_err().to_string();
        assert!(err.contains("no rank is set"), "{err}");
        let err = env(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h")]).unwrap_err().to_string();
        assert!(err.contains("RANK=2 is not a rank of WORLD_SIZE=2"), "{err}");
        let err = env(&[("WORLD_SIZE", "two")]).unwrap_err().to_string();
        assert!(err.contains("WORLD_SIZE=\"two\""), "{err}");
        let err = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_PORT"), "{err}");
    }

    #[test]
    fn the_rendezvous_port_steps_aside_for_torchruns_store() {
        let e = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")])
            .unwrap()
            .unwrap();
        assert_eq!(e.rendezvous_port(|_| None).unwrap(), 29500);
        let torchrun = |k: &str| (k == "TORCHELASTIC_USE_AGENT_STORE").then(|| "True".to_string());
        assert_eq!(e.rendezvous_port(torchrun).unwrap(), 29501);
        let explicit = |k: &str| (k == "CTXALIGN_MASTER_PORT").then(|| "4000".to_string());
        assert_eq!(e.rendezvous_port(explicit).unwrap(), 4000);
    }
}
