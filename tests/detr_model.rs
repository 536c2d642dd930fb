//! DETR building blocks against PyTorch (tests/fixtures/make_detr_fixtures.py) and the model's
//! structural guarantees.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::attention::{MhaInput, MultiHeadAttentionConfig};
use burn::tensor::{Bool, Tensor, TensorData};
use densekd::backend::{Inference, Training};
use densekd::data::detection::DetTarget;
use densekd::model::backbone::{Arch, BackboneConfig};
use densekd::model::detr::denoising::{denoising_groups, DenoisingConfig};
use densekd::model::detr::loss::{detr_loss, ProposalAssignment, SetLossWeights};
use densekd::model::detr::{narrow_layers, DetrConfig, InitialQueries};
use densekd::model::layers::norm::NormKind;
use densekd::model::layers::position::{box_gaussian_prior, cell_centres, sine_position_encoding};
use densekd::model::layers::transformer::{biased_attention, group_attention_mask, LayerConfig};
use densekd::ops::matcher::MatchCosts;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/detr_criterion.json"
    );
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .flat_map(|x| match x {
            Value::Array(_) => floats(x),
            _ => vec![x.as_f64().expect("number") as f32],
        })
        .collect()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_bool().expect("bool"))
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

fn values<const D: usize>(t: Tensor<Inference, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32")
}

#[test]
fn sine_position_encoding_matches_detr() {
    let f = fixture();
    let p = &f["position"];
    let shape: Vec<usize> = p["mask_shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let got = sine_position_encoding(
        &bools(&p["mask"]),
        [shape[0], shape[1], shape[2]],
        p["channels"].as_u64().expect("c") as usize,
    );
    assert_close(&got, &floats(&p["pos"]), 1e-5, "pos");
}

#[test]
fn masked_attention_matches_pytorch() {
    let f = fixture();
    let a = &f["attention"];
    let d = a["d_model"].as_u64().expect("d") as usize;
    let device = Default::default();
    let mut mha = MultiHeadAttentionConfig::new(d, a["heads"].as_u64().expect("heads") as usize)
        .with_dropout(0.0)
        .init::<Inference>(&device);
    // PyTorch stores `out = x W^T + b`; burn's Linear weight is `[in, out]`.
    let weight = |k: &str| {
        Param::from_tensor(
            Tensor::<Inference, 2>::from_data(TensorData::new(floats(&a[k]), [d, d]), &device)
                .transpose(),
        )
    };
    let bias = |k: &str| {
        Some(Param::from_tensor(Tensor::<Inference, 1>::from_data(
            TensorData::new(floats(&a[k]), [d]),
            &device,
        )))
    };
    for (lin, w, b) in [
        (&mut mha.query, "wq", "bq"),
        (&mut mha.key, "wk", "bk"),
        (&mut mha.value, "wv", "bv"),
        (&mut mha.output, "wo", "bo"),
    ] {
        lin.weight = weight(w);
        lin.bias = bias(b);
    }
    let groups: Vec<usize> = a["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| g.as_u64().expect("g") as usize)
        .collect();
    let total: usize = groups.iter().sum();
    let t3 = |k: &str, l: usize| {
        Tensor::<Inference, 3>::from_data(TensorData::new(floats(&a[k]), [2, l, d]), &device)
    };
    let (x, pos) = (t3("x", total), t3("pos", total));
    let qk = x.clone() + pos;
    let mask = group_attention_mask::<Inference>(&groups, 2, &device);
    let out = mha
        .forward(MhaInput::new(qk.clone(), qk, x.clone()).mask_attn(mask))
        .context;
    assert_close(
        &values(out),
        &floats(&a["self_out"]),
        1e-5,
        "grouped self-attention",
    );

    let memory = t3("memory", 6);
    let pad = Tensor::<Inference, 2, Bool>::from_data(
        TensorData::new(bools(&a["memory_padding"]), [2, 6]),
        &device,
    );
    let cross = mha
        .forward(MhaInput::new(x.clone(), memory.clone(), memory.clone()).mask_pad(pad.clone()))
        .context;
    assert_close(
        &values(cross),
        &floats(&a["cross_out"]),
        1e-5,
        "padded cross-attention",
    );
    // The decoder's own attention (which can take a spatial prior) is the same computation.
    let decoder_path = biased_attention(
        &mha,
        x.clone(),
        memory.clone(),
        memory.clone(),
        pad.clone(),
        None,
    );
    assert_close(
        &values(decoder_path),
        &floats(&a["cross_out"]),
        1e-5,
        "biased_attention without bias",
    );
    // A bias of −∞ on all keys but one makes every query read exactly that key's value.
    let mut bias = vec![-1e9f32; 2 * total * 6];
    for row in bias.chunks_mut(6) {
        row[1] = 0.0;
    }
    let bias = Tensor::<Inference, 3>::from_data(TensorData::new(bias, [2, total, 6]), &device);
    let focused = biased_attention(&mha, x, memory.clone(), memory.clone(), pad, Some(bias));
    let key1 = mha
        .output
        .forward(mha.value.forward(memory.narrow(1, 1, 1)))
        .repeat_dim(1, total);
    assert_close(
        &values(focused),
        &values(key1),
        1e-5,
        "attention focused by the bias",
    );
}

#[test]
fn gaussian_prior_peaks_at_the_box_centre_and_scales_with_its_size() {
    let device = Default::default();
    // One query box centred at (0.25, 0.5), 0.2 wide and 0.4 tall; σ = 0.5 × size.
    let boxes = Tensor::<Inference, 3>::from_data(
        TensorData::new(vec![0.25f32, 0.5, 0.2, 0.4], [1, 1, 4]),
        &device,
    );
    let centres = Tensor::<Inference, 3>::from_data(
        TensorData::new(vec![0.25f32, 0.5, 0.35, 0.5, 0.25, 0.7], [1, 3, 2]),
        &device,
    );
    let prior = values(box_gaussian_prior(boxes, centres, 0.5));
    // Δx = 0.1 = one σ (0.1) → −0.5; Δy = 0.2 = one σ (0.2) → −0.5.
    assert_close(&prior, &[0.0, -0.5, -0.5], 1e-6, "prior");
    // Cell centres are normalised to the unpadded region: a 2×4 map whose last column is padding.
    let pad = [false, false, false, true, false, false, false, true];
    let xy = cell_centres(&pad, [1, 2, 4]);
    assert_eq!(&xy[..4], &[1.0 / 6.0, 0.25, 0.5, 0.25]);
}

fn tiny_detr(groups: usize) -> DetrConfig {
    DetrConfig {
        backbone: BackboneConfig {
            arch: Arch::Resnet18,
            width: 0.125,
            norm: NormKind::Batch,
            frozen_stages: 0,
            output_stride: 32,
            last_conv: true,
            blocks: Some([1, 1, 1, 1]),
            num_classes: None,
        },
        feature_strides: vec![8, 32],
        spatial_prior: 0.5,
        deformable_points: 0,
        two_stage: false,
        dense_head: false,
        encoder_strides: Vec::new(),
        denoising: DenoisingConfig::default(),
        num_classes: 3,
        num_queries: 5,
        groups,
        layer: LayerConfig {
            d_model: 32,
            heads: 4,
            ffn: 64,
            dropout: 0.0,
        },
        encoder_layers: 1,
        decoder_layers: 2,
    }
}

#[test]
fn query_groups_do_not_see_each_other() {
    let device = Default::default();
    let model = tiny_detr(3).init::<Inference>(&device).expect("builds");
    let images = Tensor::<Inference, 4>::random(
        [2, 3, 64, 96],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let mut padding = vec![false; 2 * 64 * 96];
    padding[64 * 96..]
        .iter_mut()
        .enumerate()
        .for_each(|(i, p)| *p = i % 96 >= 64);
    let all = model.forward(images.clone(), &padding, 3);
    let one = model.forward(images, &padding, 1);
    assert_eq!(all.group_sizes, vec![5, 5, 5]);
    assert_eq!(all.layers.len(), 2);
    let last = all.last();
    assert_eq!(last.logits.dims(), [2, 15, 3]);
    assert_eq!(last.boxes.dims(), [2, 15, 4]);
    // Group 1 decoded alongside groups 2 and 3 equals group 1 decoded alone.
    let first = |t: Tensor<Inference, 3>| values(t.narrow(1, 0, 5));
    assert_close(
        &first(last.boxes.clone()),
        &values(one.last().boxes.clone()),
        1e-5,
        "group 1 boxes",
    );
    assert_close(
        &first(last.logits.clone()),
        &values(one.last().logits.clone()),
        1e-5,
        "group 1 logits",
    );
    let boxes = values(last.boxes.clone());
    assert!(
        boxes.iter().all(|v| (0.0..=1.0).contains(v)),
        "boxes are normalised"
    );
}

fn target(boxes: &[[f32; 4]], classes: &[usize]) -> DetTarget {
    DetTarget {
        image_id: 0,
        boxes: boxes.to_vec(),
        classes: classes.to_vec(),
        size: (64, 64),
        orig_size: (64, 64),
    }
}

#[test]
fn denoising_queries_are_noised_ground_truth_in_masked_groups() {
    let device = Default::default();
    let mut cfg = tiny_detr(1);
    cfg.denoising = DenoisingConfig {
        groups: 2,
        box_noise: 0.0,
        label_noise: 0.0,
        weight: 1.0,
    };
    let targets = [
        target(&[[0.3, 0.4, 0.2, 0.1], [0.7, 0.6, 0.3, 0.5]], &[2, 0]),
        target(&[[0.5, 0.5, 0.4, 0.4]], &[1]),
    ];
    let model = cfg.init::<Inference>(&device).expect("builds");
    let dn = denoising_groups(&model, &targets, 0).expect("groups");
    assert_eq!(dn.group_sizes(), vec![2, 2]);
    let pairs: Vec<_> = dn.pairs.iter().map(|a| a.pairs.clone()).collect();
    assert_eq!(
        pairs,
        [vec![(0, 0), (1, 1), (2, 0), (3, 1)], vec![(0, 0), (2, 0)]]
    );
    // Without noise the references are the boxes; the second image's free slots are padding.
    let pad = [0.5, 0.5, 0.2, 0.2];
    let g0 = [[0.3, 0.4, 0.2, 0.1], [0.7, 0.6, 0.3, 0.5]];
    let expected: Vec<f32> = [
        g0,
        g0,
        [[0.5, 0.5, 0.4, 0.4], pad],
        [[0.5, 0.5, 0.4, 0.4], pad],
    ]
    .iter()
    .flatten()
    .flatten()
    .copied()
    .collect();
    assert_close(
        &values(dn.queries.reference.clone()),
        &expected,
        0.0,
        "refs",
    );
    let embed = model.label_embed.as_ref().expect("label embedding").val();
    let rows = |labels: &[usize]| -> Vec<f32> {
        labels
            .iter()
            .flat_map(|&l| values(embed.clone().narrow(0, l, 1)))
            .collect()
    };
    let expected = rows(&[2, 0, 2, 0, 1, 3, 1, 3]);
    assert_close(
        &values(dn.queries.content.clone()),
        &expected,
        0.0,
        "content",
    );

    // Noise stays inside its bounds: centres within λ/2 of the size, sizes within 1 ± λ.
    let mut noisy = cfg.clone();
    noisy.denoising.box_noise = 0.4;
    noisy.denoising.groups = 50;
    let model = noisy.init::<Inference>(&device).expect("builds");
    let dn = denoising_groups(&model, &targets[..1], 0).expect("groups");
    let refs = values(dn.queries.reference.clone());
    let mut moved = 0;
    for (r, g) in refs.chunks(4).zip(g0.iter().cycle()) {
        for k in 0..2 {
            assert!(
                (r[k] - g[k]).abs() <= 0.2 * g[k + 2] + 1e-6,
                "{r:?} vs {g:?}"
            );
            assert!(
                (r[k + 2] / g[k + 2] - 1.0).abs() <= 0.4 + 1e-6,
                "{r:?} vs {g:?}"
            );
        }
        moved += usize::from(r != g);
    }
    assert_eq!(moved, 100, "every copy is noised");

    // Decoding the denoising groups after the matching queries leaves the latter unchanged.
    let images = Tensor::<Inference, 4>::random(
        [1, 3, 64, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let padding = vec![false; 64 * 64];
    let encoded = model.encode(images, &padding);
    let main = model.initial_queries(&encoded, 1);
    let alone = model.decode(&encoded, main.clone(), &[5]);
    let sizes = [vec![5], dn.group_sizes()].concat();
    let joint = model.decode(
        &encoded,
        InitialQueries::cat(vec![main, dn.queries.clone()]),
        &sizes,
    );
    let last = |l: &[densekd::model::detr::LayerPrediction<Inference>]| {
        values(l[1].boxes.clone().narrow(1, 0, 5))
    };
    assert_close(&last(&joint), &last(&alone), 1e-5, "matching queries");
    let dn_layers = narrow_layers(&joint, 5, dn.queries.len());
    let loss = dn.loss(&dn_layers, &targets[..1], &Default::default());
    let loss = values(loss.expect("a loss").unsqueeze::<2>())[0];
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
}

#[test]
fn feature_strides_must_be_backbone_strides() {
    let mut config = tiny_detr(1);
    config.feature_strides = vec![8, 16, 32];
    assert!(config.init::<Inference>(&Default::default()).is_ok());
    config.feature_strides = vec![2];
    let e = config
        .init::<Inference>(&Default::default())
        .expect_err("stride 2");
    assert!(e.to_string().contains("feature_strides"), "{e}");
}

/// Names of the trainable float parameters that got no gradient (burn's running statistics are
/// skipped: they are buffers, not parameters).
struct Untrained<'a> {
    grads: &'a <Training as burn::tensor::backend::AutodiffBackend>::Gradients,
    path: Vec<String>,
    missing: Vec<String>,
    seen: usize,
}

impl ModuleVisitor<Training> for Untrained<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Training, D>>) {
        if self.path.last().is_some_and(|n| n.starts_with("running_")) {
            return;
        }
        self.seen += 1;
        if param.grad(self.grads).is_none() {
            self.missing.push(self.path.join("."));
        }
    }
}

#[test]
fn every_parameter_of_a_fresh_model_is_trained() {
    // Zero- or constant-initialised heads once lost `require_grad` (burn's `Param::map` takes it
    // from the new tensor), so the box refinement never learned and every query kept its anchor.
    // Global and deformable cross-attention.
    for deformable_points in [0, 2] {
        let device = Default::default();
        let mut cfg = tiny_detr(2);
        cfg.deformable_points = deformable_points;
        cfg.dense_head = true;
        cfg.denoising = DenoisingConfig {
            groups: 2,
            ..DenoisingConfig::default()
        };
        let model = cfg.init::<Training>(&device).expect("builds");
        let images = Tensor::<Training, 4>::random(
            [2, 3, 64, 64],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let targets = vec![
            target(&[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.3]], &[0, 2]),
            target(&[[0.5, 0.5, 0.6, 0.5]], &[1]),
        ];
        let dn = denoising_groups(&model, &targets, 0).expect("denoising is on");
        let (output, extra) = model.forward_with_extra(
            images,
            &vec![false; 2 * 64 * 64],
            2,
            vec![(dn.queries.clone(), dn.group_sizes())],
        );
        let weights = SetLossWeights {
            proposal_assignment: ProposalAssignment::Centre,
            ..SetLossWeights::default()
        };
        let loss = detr_loss(&output, &targets, &weights, &MatchCosts::default()).expect("loss");
        let total =
            loss.weighted(&weights) + dn.loss(&extra[0], &targets, &weights).expect("dn loss");
        let grads = total.backward();
        let mut visitor = Untrained {
            grads: &grads,
            path: Vec::new(),
            missing: Vec::new(),
            seen: 0,
        };
        model.visit(&mut visitor);
        assert!(
            visitor.seen > 50,
            "visited only {} parameters",
            visitor.seen
        );
        assert!(
            visitor.missing.is_empty(),
            "parameters without gradient (deformable_points {deformable_points}): {:?}",
            visitor.missing
        );
    }
}
