//! Model names and their parsing.

use std::fmt;
use std::str::FromStr;

use crate::ModelError;

/// Which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Conv 32 → Conv 64 → MaxPool → Dropout .25 → Dense 128 → Dropout .5 → Dense 10.
    SimpleCnn,
    /// The 10-convolution network with BatchNorm everywhere and Dense 1024.
    ComplexCnn,
    /// ResNet v1 for CIFAR with `6n+2` layers, optionally with dropout.
    Resnet {
        /// Blocks per stack.
        n: usize,
        /// Dropout .3 inside each block and .4 before the dense layer.
        dropout: bool,
    },
}

/// A model kind plus switches that do not change its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// The network.
    pub kind: ModelKind,
    /// Whether dropout layers are active in training (tests switch them off).
    pub dropout: bool,
}

impl ModelSpec {
    /// The network with its dropout layers active.
    pub fn new(kind: ModelKind) -> Self {
        Self {
            kind,
            dropout: true,
        }
    }
}

impl FromStr for ModelKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "simple-cnn" => return Ok(ModelKind::SimpleCnn),
            "complex-cnn" => return Ok(ModelKind::ComplexCnn),
            _ => {}
        }
        let unknown = || ModelError::UnknownModel(s.to_string());
        let rest = s.strip_prefix("resnet").ok_or_else(unknown)?;
        let (depth, dropout) = match rest.strip_suffix("-dropout") {
            Some(d) => (d, true),
            None => (rest, false),
        };
        let depth: usize = depth.parse().map_err(|_| unknown())?;
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(unknown());
        }
        Ok(ModelKind::Resnet {
            n: (depth - 2) / 6,
            dropout,
        })
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelKind::SimpleCnn => write!(f, "simple-cnn"),
            ModelKind::ComplexCnn => write!(f, "complex-cnn"),
            ModelKind::Resnet { n, dropout } => {
                write!(
                    f,
                    "resnet{}{}",
                    6 * n + 2,
                    if *dropout { "-dropout" } else { "" }
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_names() {
        for name in [
            "simple-cnn",
            "complex-cnn",
            "resnet20",
            "resnet20-dropout",
            "resnet50-dropout",
            "resnet8",
        ] {
            assert_eq!(name.parse::<ModelKind>().unwrap().to_string(), name);
        }
        assert_eq!(
            "resnet50-dropout".parse::<ModelKind>().unwrap(),
            ModelKind::Resnet {
                n: 8,
                dropout: true
            }
        );
        for bad in [
            "resnet21",
            "resnet",
            "resnet2",
            "vgg16",
            "resnet20-dropout-x",
            "",
        ] {
            assert!(bad.parse::<ModelKind>().is_err(), "{bad}");
        }
    }
}
