//! The diffusion process: noise schedules and their derived tables (CompVis
//! `ldm/modules/diffusionmodules/util.py`, `DDPM.register_schedule`), and the DDIM timestep and
//! sigma tables (`make_ddim_timesteps`, `make_ddim_sampling_parameters`). Computed in f64.

mod schedule;

pub use schedule::{
    BetaSchedule, DdimDiscretization, DdimTables, DiffusionSchedule, ddim_tables, ddim_timesteps,
    make_beta_schedule,
};
