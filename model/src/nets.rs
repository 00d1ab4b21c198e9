//! The seed networks, written to read like their Keras listings.

use candle_core::{Module, Tensor};

use crate::layers::{
    dropout, relu, residual_blocks, BatchNorm, Conv2d, ConvCfg, Dense, Kernel, MaxPool2d, Padding,
    Pass, ResidualLayers,
};
use crate::params::Registry;
use crate::{ModelError, ModelKind};

type Result<T> = std::result::Result<T, ModelError>;

/// L2 factor of every ResNet convolution kernel (Keras `l2(1e-4)`).
pub(crate) const RESNET_L2: f32 = 1e-4;

pub(crate) enum Net {
    Simple(SimpleCnn),
    Complex(ComplexCnn),
    Resnet(Resnet),
}

impl Net {
    pub fn new(kind: ModelKind, reg: &mut Registry) -> Result<Self> {
        Ok(match kind {
            ModelKind::SimpleCnn => Net::Simple(SimpleCnn::new(reg)?),
            ModelKind::ComplexCnn => Net::Complex(ComplexCnn::new(reg)?),
            ModelKind::Resnet { n, dropout } => Net::Resnet(Resnet::new(reg, n, dropout)?),
        })
    }

    /// Logits (N, 10) for images (N, 3, 32, 32) in [0, 1].
    pub fn forward(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        match self {
            Net::Simple(n) => n.forward(x, pass),
            Net::Complex(n) => n.forward(x, pass),
            Net::Resnet(n) => n.forward(x, pass),
        }
    }
}

fn glorot(k: usize, padding: Padding) -> ConvCfg {
    ConvCfg {
        k,
        stride: 1,
        padding,
        kernel: Kernel::Glorot,
        l2: 0.0,
    }
}

/// Conv 32 3×3 valid ReLU → Conv 64 3×3 valid ReLU → MaxPool 2 → Dropout .25
/// → Flatten → Dense 128 ReLU → Dropout .5 → Dense 10.
pub(crate) struct SimpleCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    dense1: Dense,
    dense2: Dense,
}

impl SimpleCnn {
    fn new(reg: &mut Registry) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::new(reg, "conv1", 3, 32, glorot(3, Padding::Valid))?,
            conv2: Conv2d::new(reg, "conv2", 32, 64, glorot(3, Padding::Valid))?,
            pool: MaxPool2d::new(reg, 2),
            dense1: Dense::new(reg, "dense1", 64 * 14 * 14, 128, Kernel::Glorot)?,
            dense2: Dense::new(reg, "dense2", 128, 10, Kernel::Glorot)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let x = self.conv1.forward_act(x, true)?;
        let x = self.pool.after_conv_relu(&self.conv2, &x)?;
        let x = dropout(&x, 0.25, pass)?.flatten_from(1)?;
        let x = relu(&self.dense1.forward(&x)?, pass)?;
        let x = dropout(&x, 0.5, pass)?;
        Ok(self.dense2.forward(&x)?)
    }
}

/// Conv → BatchNorm → ReLU.
pub(crate) struct ConvBnRelu {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBnRelu {
    fn new(reg: &mut Registry, name: &str, cin: usize, cout: usize, k: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                reg,
                &format!("{name}.conv"),
                cin,
                cout,
                glorot(k, Padding::Same),
            )?,
            bn: BatchNorm::new(reg, &format!("{name}.bn"), cout)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        self.bn.after_conv(&self.conv, x, pass, true)
    }
}

/// [Conv 64 3×3, BN, ReLU], [Conv 128 3×3, BN, ReLU]×2 → MaxPool → Dropout .25
/// → [Conv 256 2×2, BN, ReLU]×3 → MaxPool → Dropout .25 → [Conv 512 2×2, BN,
/// ReLU]×3 → MaxPool → Dropout .25 → Flatten → Dense 1024 → BN → ReLU →
/// Dropout .5 → Dense 10. All convolutions "same".
pub(crate) struct ComplexCnn {
    groups: Vec<Vec<ConvBnRelu>>,
    pool: MaxPool2d,
    dense1: Dense,
    bn_dense: BatchNorm,
    dense2: Dense,
}

impl ComplexCnn {
    fn new(reg: &mut Registry) -> Result<Self> {
        let plan: [(&[usize], usize); 3] = [
            (&[64, 128, 128], 3),
            (&[256, 256, 256], 2),
            (&[512, 512, 512], 2),
        ];
        let mut cin = 3;
        let mut groups = Vec::new();
        for (g, (widths, k)) in plan.iter().enumerate() {
            let mut layers = Vec::new();
            for (i, &cout) in widths.iter().enumerate() {
                layers.push(ConvBnRelu::new(
                    reg,
                    &format!("group{}.layer{i}", g + 1),
                    cin,
                    cout,
                    *k,
                )?);
                cin = cout;
            }
            groups.push(layers);
        }
        Ok(Self {
            groups,
            pool: MaxPool2d::new(reg, 2),
            dense1: Dense::new(reg, "dense1", 512 * 4 * 4, 1024, Kernel::Glorot)?,
            bn_dense: BatchNorm::new(reg, "dense1.bn", 1024)?,
            dense2: Dense::new(reg, "dense2", 1024, 10, Kernel::Glorot)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let mut x = x.clone();
        for group in &self.groups {
            for layer in group {
                x = layer.forward(&x, pass)?;
            }
            x = dropout(&self.pool.forward(&x)?, 0.25, pass)?;
        }
        let x = self.dense1.forward(&x.flatten_from(1)?)?;
        let x = self.bn_dense.forward_act(&x, pass, true)?;
        let x = dropout(&x, 0.5, pass)?;
        Ok(self.dense2.forward(&x)?)
    }
}

/// Keras `resnet_layer`: Conv (he_normal, L2 1e-4, same) → BN → [ReLU].
struct ResnetLayer {
    conv: Conv2d,
    bn: BatchNorm,
    relu: bool,
}

impl ResnetLayer {
    fn new(
        reg: &mut Registry,
        name: &str,
        cin: usize,
        cout: usize,
        stride: usize,
        relu: bool,
    ) -> Result<Self> {
        let cfg = ConvCfg {
            k: 3,
            stride,
            padding: Padding::Same,
            kernel: Kernel::He,
            l2: RESNET_L2,
        };
        Ok(Self {
            conv: Conv2d::new(reg, &format!("{name}.conv"), cin, cout, cfg)?,
            bn: BatchNorm::new(reg, &format!("{name}.bn"), cout)?,
            relu,
        })
    }

    fn forward(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        self.bn.after_conv(&self.conv, x, pass, self.relu)
    }

    /// `ReLU(shortcut + layer(x))` (a layer without its own ReLU).
    fn forward_add_relu(&self, x: &Tensor, shortcut: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        self.bn.after_conv_add_relu(&self.conv, x, shortcut, pass)
    }
}

/// y = layer(x) → [Dropout .3] → layer(y, no ReLU); x = ReLU(shortcut(x) + y).
struct ResidualBlock {
    first: ResnetLayer,
    second: ResnetLayer,
    /// 1×1 stride-2 projection (no BN, no activation) at the first block of stacks 2 and 3.
    shortcut: Option<Conv2d>,
}

/// ResNet v1 for CIFAR-10 with `6n+2` layers.
pub(crate) struct Resnet {
    stem: ResnetLayer,
    blocks: Vec<ResidualBlock>,
    dense: Dense,
    dropout: bool,
}

impl Resnet {
    fn new(reg: &mut Registry, n: usize, dropout: bool) -> Result<Self> {
        let stem = ResnetLayer::new(reg, "stem", 3, 16, 1, true)?;
        let mut blocks = Vec::new();
        let mut cin = 16;
        for stack in 0..3 {
            let filters = 16 << stack;
            for block in 0..n {
                let stride = if stack > 0 && block == 0 { 2 } else { 1 };
                let name = format!("stack{}.block{block}", stack + 1);
                let first =
                    ResnetLayer::new(reg, &format!("{name}.layer1"), cin, filters, stride, true)?;
                let second =
                    ResnetLayer::new(reg, &format!("{name}.layer2"), filters, filters, 1, false)?;
                let shortcut = if stride != 1 {
                    let cfg = ConvCfg {
                        k: 1,
                        stride,
                        padding: Padding::Same,
                        kernel: Kernel::He,
                        l2: RESNET_L2,
                    };
                    Some(Conv2d::new(
                        reg,
                        &format!("{name}.shortcut"),
                        cin,
                        filters,
                        cfg,
                    )?)
                } else {
                    None
                };
                blocks.push(ResidualBlock {
                    first,
                    second,
                    shortcut,
                });
                cin = filters;
            }
        }
        let dense = Dense::new(reg, "dense", 64, 10, Kernel::He)?;
        Ok(Self {
            stem,
            blocks,
            dense,
            dropout,
        })
    }

    fn forward(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let mut x = self.stem.forward(x, pass)?;
        // All the blocks as one op where the fast path trains.
        let layers: Vec<ResidualLayers> = self
            .blocks
            .iter()
            .map(|b| {
                let (first, second) = (&b.first, &b.second);
                (
                    (&first.conv, &first.bn),
                    (&second.conv, &second.bn),
                    b.shortcut.as_ref(),
                )
            })
            .collect();
        let rate = self.dropout.then_some(0.3);
        if let Some(z) = residual_blocks(&x, &layers, rate, pass)? {
            x = z;
        } else {
            for b in &self.blocks {
                let y = b.first.forward(&x, pass)?;
                let y = if self.dropout {
                    dropout(&y, 0.3, pass)?
                } else {
                    y
                };
                let shortcut = match &b.shortcut {
                    Some(conv) => conv.forward(&x)?,
                    None => x,
                };
                x = b.second.forward_add_relu(&y, &shortcut, pass)?;
            }
        }
        let x = x.avg_pool2d(8)?.flatten_from(1)?;
        let x = if self.dropout {
            dropout(&x, 0.4, pass)?
        } else {
            x
        };
        Ok(self.dense.forward(&x)?)
    }
}
