//! First-stage training losses (CompVis `ldm/modules/losses`, taming `modules/losses` and
//! `modules/discriminator`): LPIPS, the PatchGAN discriminator with hinge/vanilla losses, and
//! `LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator` with the adaptive GAN weight.

mod discriminator;
mod lpips;
mod perceptual;

pub use perceptual::{
    DiscLossKind, GeneratorLoss, LastLayer, LossLog, PerceptualLoss, PerceptualLossConfig,
};

pub use discriminator::{
    ActNorm, DiscLayer, NLayerDiscriminator, NLayerDiscriminatorConfig, adopt_weight, hinge_d_loss,
    vanilla_d_loss,
};
pub use lpips::{LPIPS_CHANNELS, Lpips, NetLinLayer, VGG16_CONV_INDICES, Vgg16Features};
