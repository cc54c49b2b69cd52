//! Numerical parity with the reference implementation, module by module. Fixtures come from
//! `xtask/fixtures/*.py` (run `cargo xtask fixtures`), which build the reference modules in PyTorch.

mod autoencoder;
mod conditioning;
mod loading;
mod losses;
mod pipelines;
mod presets;
mod samplers;
mod schedules;
mod unet;
