//! A small multi-layer perceptron.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation::relu, backend::Backend, Tensor};

/// A small MLP (ReLU between layers), as DETR's box head.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// The layers.
    pub layers: Vec<Linear<B>>,
}

impl<B: Backend> Mlp<B> {
    /// Linear layers of sizes `dims[0] → dims[1] → …`.
    pub fn new(dims: &[usize], device: &B::Device) -> Self {
        Mlp {
            layers: dims
                .windows(2)
                .map(|d| LinearConfig::new(d[0], d[1]).init(device))
                .collect(),
        }
    }

    /// Applies the layers, ReLU between them.
    pub fn forward(&self, mut x: Tensor<B, 3>) -> Tensor<B, 3> {
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}
