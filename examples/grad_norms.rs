//! Per-parameter gradient norms of an exported FCOS model on its config's first training batch,
//! per loss term: run under two backends to find the op whose gradient differs.
//! `grad_norms CONFIG.toml MODEL.safetensors`
use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use densekd::backend::Training;
use densekd::model::fcos::task::FcosTask;
use densekd::task::Task;
use densekd::train::config::{ModelSection, TrainConfig};

type Grads = <Training as AutodiffBackend>::Gradients;

struct Norms<'a> {
    grads: &'a Grads,
    path: Vec<String>,
    out: Vec<(String, f64)>,
}

impl ModuleVisitor<Training> for Norms<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Training, D>>) {
        let path = self.path.join(".");
        if path.contains("Frozen") {
            return;
        }
        if let Some(g) = param.val().grad(self.grads) {
            let n = g.powi_scalar(2).sum().into_scalar().elem::<f64>().sqrt();
            self.out.push((path, n));
        }
    }
}

/// Every parameter a leaf that takes a gradient (loaded exports come frozen).
struct RequireGrad;

impl ModuleMapper<Training> for RequireGrad {
    fn map_float<const D: usize>(
        &mut self,
        param: Param<Tensor<Training, D>>,
    ) -> Param<Tensor<Training, D>> {
        let (id, value, mapper) = param.consume();
        Param::from_mapped_value(id, value.detach().require_grad(), mapper)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let config = TrainConfig::load(Path::new(&args[1]), &[])?;
    let ModelSection::Fcos(section) = config.model()? else {
        anyhow::bail!("not an FCOS config");
    };
    let task = FcosTask::new(&config.task_inputs(), section)?;
    let inner = <FcosTask as Task<Training>>::load_export(&task, Path::new(&args[2]))?;
    let model = <FcosTask as Task<Training>>::Model::from_inner(inner).map(&mut RequireGrad);
    let batch = <FcosTask as Task<Training>>::train_batches(&task, 0, 0)
        .next()
        .expect("a batch")?;
    let names: Vec<String> = {
        let out = task.forward(&model, &batch)?;
        let losses = task.loss(&out, &batch)?;
        losses.terms.into_iter().map(|(n, _)| n).collect()
    };
    // A backward pass consumes the graph: one forward pass per term.
    for (i, name) in names.iter().enumerate() {
        let out = task.forward(&model, &batch)?;
        let term = task.loss(&out, &batch)?.terms.swap_remove(i).1;
        let value = term.clone().into_scalar().elem::<f64>();
        let grads = term.backward();
        let mut norms = Norms {
            grads: &grads,
            path: Vec::new(),
            out: Vec::new(),
        };
        model.visit(&mut norms);
        let total: f64 = norms.out.iter().map(|(_, n)| n * n).sum::<f64>().sqrt();
        println!("{name} = {value:.6}: grad norm {total:.6}");
        norms.out.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (p, n) in norms.out.iter().take(6) {
            println!("  {n:12.6} {p}");
        }
    }
    Ok(())
}
