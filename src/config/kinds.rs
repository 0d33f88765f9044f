//! Fixed-value settings as enums, parsed once: by clap on the command line and by serde in a
//! recipe, with the same spellings (aliases included) in both.

use std::fmt;
use std::str::FromStr;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// Prints the value the way both clap and serde spell it (needed by clap's `default_value_t`).
macro_rules! display_as_value {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.to_possible_value() {
                    Some(v) => f.write_str(v.get_name()),
                    None => write!(f, "{self:?}"),
                }
            }
        }
    };
}

/// Compute dtype of the target forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// bf16 on a GPU, f32 on the CPU (CPU bf16 matmuls are slow).
    #[default]
    Auto,
    /// float32.
    #[value(alias = "float32")]
    #[serde(alias = "float32")]
    F32,
    /// bfloat16.
    #[value(alias = "bfloat16")]
    #[serde(alias = "bfloat16")]
    Bf16,
    /// float16.
    #[value(alias = "float16")]
    #[serde(alias = "float16")]
    F16,
}
display_as_value!(Dtype);

impl Dtype {
    /// The libtorch kind on `device`.
    pub fn kind(self, device: Device) -> Kind {
        match self {
            Dtype::Auto if device.is_cuda() => Kind::BFloat16,
            Dtype::Auto | Dtype::F32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
            Dtype::F16 => Kind::Half,
        }
    }
}

/// Feature dtype on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    /// bfloat16 (what the trainer reads by default).
    #[default]
    #[value(alias = "bfloat16")]
    #[serde(alias = "bfloat16")]
    Bf16,
    /// float16.
    #[value(alias = "float16")]
    #[serde(alias = "float16")]
    F16,
    /// float32.
    #[value(alias = "float32")]
    #[serde(alias = "float32")]
    F32,
}
display_as_value!(StoreDtype);

impl StoreDtype {
    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            StoreDtype::Bf16 => Kind::BFloat16,
            StoreDtype::F16 => Kind::Half,
            StoreDtype::F32 => Kind::Float,
        }
    }
}

/// Which config flavour an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// Flat Llama-style config that both vLLM and SGLang read.
    #[default]
    #[value(alias = "sglang", alias = "flat")]
    #[serde(alias = "sglang", alias = "flat")]
    Vllm,
    /// vLLM's speculators format (`speculators_model_type: eagle3`), plus the flat keys.
    Speculators,
}
display_as_value!(ExportFormat);

/// The draft architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
pub enum DraftVariant {
    /// EAGLE-3: `fc` over the concatenated aux states.
    #[default]
    #[value(name = "eagle3")]
    #[serde(rename = "eagle3")]
    Eagle3,
    /// EAGLE-3.1: one RMSNorm per aux chunk before `fc` (`fc_norm`) and `norm_output`.
    #[value(name = "eagle3.1")]
    #[serde(rename = "eagle3.1")]
    Eagle31,
}
display_as_value!(DraftVariant);

/// A byte size written for people (`1G`, `256M`, `1.5GiB` or a byte count); see
/// [`crate::util::bytes::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::util::bytes::parse(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    /// The shortest exact spelling: `1G` for 10^9, `4096` for 4096.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, m) in [("T", 1_000_000_000_000u64), ("G", 1_000_000_000), ("M", 1_000_000), ("k", 1000)] {
            if self.0 >= m && self.0 % m == 0 {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_agree_between_clap_and_serde() {
        for d in Dtype::value_variants() {
            let name = d.to_string();
            let via_serde: Dtype = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(via_serde, *d);
            assert_eq!(Dtype::from_str(&name, false).unwrap(), *d);
        }
        let v: DraftVariant = serde_json::from_value(serde_json::json!("eagle3.1")).unwrap();
        assert_eq!(v, DraftVariant::Eagle31);
        assert_eq!(DraftVariant::Eagle31.to_string(), "eagle3.1");
        let f: ExportFormat = serde_json::from_value(serde_json::json!("sglang")).unwrap();
        assert_eq!(f, ExportFormat::Vllm);
        assert_eq!(Dtype::Auto.kind(Device::Cpu), Kind::Float);
        assert_eq!(Dtype::Auto.kind(Device::Cuda(0)), Kind::BFloat16);
    }

    #[test]
    fn byte_sizes_round_trip() {
        for (text, n) in [("1G", 1_000_000_000u64), ("256M", 256_000_000), ("4096", 4096), ("1.5GiB", 1_610_612_736)] {
            let b: ByteSize = text.parse().unwrap();
            assert_eq!(b.0, n);
            assert_eq!(b.to_string().parse::<ByteSize>().unwrap(), b);
        }
        let b: ByteSize = serde_json::from_value(serde_json::json!(1024)).unwrap();
        assert_eq!(b.0, 1024);
        assert!("12Q".parse::<ByteSize>().is_err());
    }
}
