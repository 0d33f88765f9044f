//! Configuration: the lenient Hugging Face `config.json` mirror resolved into typed model configs,
//! the typed stage configs a recipe is made of (the same types are the commands' arguments), and
//! the fixed-value settings as enums.

pub mod hf;
pub mod kinds;
pub mod recipe;

pub use hf::{Arch, LayerType, LinearAttnConfig, RopeConfig, RopeScaling, TargetConfig};
pub use kinds::{ByteSize, DraftVariant, Dtype, ExportFormat, StoreDtype};
pub use recipe::{DataConfig, DraftConfig, EvalConfig, ExportConfig, ExtractConfig, Recipe, RegenerateConfig, TargetSpec, TrainConfig};
