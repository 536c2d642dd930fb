use super::*;

// COCO area ranges: small < 32², medium < 96², large otherwise.
fn area_range(area: u64) -> usize {
    match area {
        a if a < 32 * 32 => 0,
        a if a < 96 * 96 => 1,
        _ => 2,
    }
}

fn assert_identical(a: &SynthSample, b: &SynthSample) {
    assert_eq!(a.image.as_raw(), b.image.as_raw());
    assert_eq!(a.label.as_raw(), b.label.as_raw());
    assert_eq!(a.objects.len(), b.objects.len());
    for (x, y) in a.objects.iter().zip(&b.objects) {
        assert_eq!(x.class, y.class);
        assert_eq!(x.bbox, y.bbox);
        assert_eq!(x.area, y.area);
        assert_eq!(x.mask, y.mask);
    }
}

// Owner map rebuilt from the public masks: 0 background, k + 1 where object k is visible.
fn owner_from_masks(sample: &SynthSample, n: usize) -> Vec<usize> {
    let mut owner = vec![0; n * n];
    for (k, obj) in sample.objects.iter().enumerate() {
        for (o, &m) in owner.iter_mut().zip(&obj.mask) {
            if m == 1 {
                assert_eq!(*o, 0, "masks overlap");
                *o = k + 1;
            }
        }
    }
    owner
}

#[test]
fn default_config_is_valid() {
    assert_eq!(SynthConfig::default().validate(), Ok(()));
}

#[test]
fn validate_rejects_bad_configs() {
    let base = SynthConfig::default();
    let bad = [
        SynthConfig {
            size: 31,
            ..base.clone()
        },
        SynthConfig {
            size: 4096,
            ..base.clone()
        },
        SynthConfig {
            min_objects: 0,
            ..base.clone()
        },
        SynthConfig {
            min_objects: 5,
            max_objects: 4,
            ..base.clone()
        },
        SynthConfig {
            min_objects: 1,
            max_objects: 65,
            size: 512,
            ..base.clone()
        },
        SynthConfig {
            size: 32,
            max_objects: 5,
            ..base.clone()
        },
        SynthConfig {
            boundary_width: 9,
            ..base.clone()
        },
    ];
    for cfg in &bad {
        assert!(cfg.validate().is_err(), "accepted {cfg:?}");
    }
    let good = [
        SynthConfig {
            size: 32,
            max_objects: 4,
            ..base.clone()
        },
        SynthConfig {
            size: 2048,
            min_objects: 64,
            max_objects: 64,
            ..base.clone()
        },
        SynthConfig {
            boundary_width: 0,
            ..base.clone()
        },
        SynthConfig {
            boundary_width: 8,
            seed: u64::MAX,
            ..base.clone()
        },
    ];
    for cfg in &good {
        assert_eq!(cfg.validate(), Ok(()), "rejected {cfg:?}");
        assert_eq!(&cfg.clamped(), cfg);
    }
}

#[test]
fn invalid_configs_are_clamped_not_panicking() {
    let cfg = SynthConfig {
        size: 0,
        seed: 1,
        min_objects: 9,
        max_objects: 0,
        boundary_width: 100,
    };
    assert_eq!(cfg.clamped().validate(), Ok(()));
    let sample = generate(&cfg, Split::Train, 0);
    assert_eq!(sample.image.dimensions(), (MIN_SIZE, MIN_SIZE));
    assert_eq!(sample.objects.len(), 1);
}

#[test]
fn split_names() {
    assert_eq!(Split::Train.name(), "train");
    assert_eq!(Split::Val.name(), "val");
}

#[test]
fn generation_is_deterministic() {
    let cfg = SynthConfig::default();
    for (split, index) in [(Split::Train, 0), (Split::Train, 17), (Split::Val, 3)] {
        assert_identical(&generate(&cfg, split, index), &generate(&cfg, split, index));
    }
    // Order of generation must not matter (no hidden shared state).
    let later = generate(&cfg, Split::Val, 3);
    let _ = generate(&cfg, Split::Train, 99);
    assert_identical(&later, &generate(&cfg, Split::Val, 3));
}

#[test]
fn different_inputs_give_different_samples() {
    let cfg = SynthConfig::default();
    let base = generate(&cfg, Split::Train, 5);
    let other_seed = SynthConfig {
        seed: 1,
        ..cfg.clone()
    };
    for other in [
        generate(&cfg, Split::Train, 6),
        generate(&cfg, Split::Val, 5),
        generate(&other_seed, Split::Train, 5),
    ] {
        assert_ne!(base.image.as_raw(), other.image.as_raw());
        assert_ne!(base.label.as_raw(), other.label.as_raw());
    }
}

#[test]
fn object_count_in_range() {
    let base = SynthConfig::default();
    let configs = [
        base.clone(),
        SynthConfig {
            min_objects: 3,
            max_objects: 3,
            ..base.clone()
        },
        SynthConfig {
            min_objects: 8,
            max_objects: 8,
            ..base.clone()
        },
        SynthConfig {
            size: 32,
            min_objects: 2,
            max_objects: 4,
            ..base.clone()
        },
        SynthConfig {
            size: 64,
            min_objects: 4,
            max_objects: 16,
            ..base.clone()
        },
    ];
    for cfg in &configs {
        let mut seen = vec![false; cfg.max_objects + 1];
        for index in 0..60 {
            let n = generate(cfg, Split::Train, index).objects.len();
            assert!(
                (cfg.min_objects..=cfg.max_objects).contains(&n),
                "{n} objects for {cfg:?} index {index}"
            );
            seen[n] = true;
        }
        assert!(seen[cfg.min_objects] && seen[cfg.max_objects], "{cfg:?}");
    }
    // The densest valid setting still fits every object.
    let dense = SynthConfig {
        min_objects: 64,
        max_objects: 64,
        ..base
    };
    for index in 0..20 {
        assert_eq!(generate(&dense, Split::Val, index).objects.len(), 64);
    }
}

#[test]
fn masks_boxes_and_areas_agree() {
    let base = SynthConfig::default();
    for cfg in [
        base.clone(),
        SynthConfig {
            size: 96,
            seed: 7,
            ..base
        },
    ] {
        let n = cfg.size as usize;
        for index in 0..40 {
            let sample = generate(&cfg, Split::Val, index);
            assert_eq!(sample.image.dimensions(), (cfg.size, cfg.size));
            assert_eq!(sample.label.dimensions(), (cfg.size, cfg.size));
            // Also checks that masks are disjoint.
            owner_from_masks(&sample, n);
            for obj in &sample.objects {
                assert!(obj.class < NUM_CLASSES);
                assert_eq!(obj.mask.len(), n * n);
                assert!(obj.mask.iter().all(|&m| m <= 1));
                let pixels: Vec<(usize, usize)> = (0..n * n)
                    .filter(|&p| obj.mask[p] == 1)
                    .map(|p| (p % n, p / n))
                    .collect();
                assert_eq!(obj.area, pixels.len() as u64);
                assert!(obj.area >= MIN_VISIBLE_PX as u64);
                let x0 = pixels.iter().map(|p| p.0).min().unwrap_or(0);
                let x1 = pixels.iter().map(|p| p.0).max().unwrap_or(0);
                let y0 = pixels.iter().map(|p| p.1).min().unwrap_or(0);
                let y1 = pixels.iter().map(|p| p.1).max().unwrap_or(0);
                let expected = [x0, y0, x1 - x0 + 1, y1 - y0 + 1].map(|v| v as f64);
                assert_eq!(obj.bbox, expected);
            }
        }
    }
}

#[test]
fn label_map_matches_masks() {
    for width in [0usize, 1, 2] {
        let cfg = SynthConfig {
            boundary_width: width as u32,
            ..SynthConfig::default()
        };
        let n = cfg.size as usize;
        let (mut object_px, mut labelled_px) = (0usize, 0usize);
        for index in 0..40 {
            let sample = generate(&cfg, Split::Train, index);
            let owner = owner_from_masks(&sample, n);
            let label = sample.label.as_raw();
            for y in 0..n {
                for x in 0..n {
                    let p = y * n + x;
                    let o = owner[p];
                    let expected = if o == 0 {
                        0
                    } else {
                        sample.objects[o - 1].class as u8 + 1
                    };
                    let window_differs =
                        (y.saturating_sub(width)..(y + width + 1).min(n)).any(|yy| {
                            (x.saturating_sub(width)..(x + width + 1).min(n))
                                .any(|xx| owner[yy * n + xx] != o)
                        });
                    if label[p] == IGNORE_INDEX {
                        assert!(window_differs, "ignored pixel away from any boundary");
                    } else {
                        assert_eq!(label[p], expected, "pixel ({x}, {y})");
                        // The band must exist: an object pixel next to background is
                        // labelled, so the background pixel beside it is ignored.
                    }
                    if width == 0 || !window_differs {
                        assert_ne!(label[p], IGNORE_INDEX);
                    }
                    if o > 0 {
                        object_px += 1;
                        labelled_px += usize::from(label[p] == expected);
                    }
                }
            }
            // Every background pixel touching an object must be in the band.
            if width > 0 {
                for y in 0..n {
                    for x in 1..n {
                        let (a, b) = (owner[y * n + x - 1], owner[y * n + x]);
                        if a == 0 && b > 0 {
                            assert_eq!(label[y * n + x - 1], IGNORE_INDEX);
                        }
                    }
                }
            }
        }
        // The band sits outside objects, so most object pixels keep their class.
        let kept = labelled_px as f64 / object_px as f64;
        assert!(
            kept > 0.9,
            "width {width}: only {kept:.3} object pixels labelled"
        );
    }
}

#[test]
fn objects_stand_out_from_their_surroundings() {
    // Image and masks agree: an object's mean colour differs clearly from the pixels
    // just outside it (its ignore band), whatever lies there.
    let cfg = SynthConfig::default();
    let n = cfg.size as usize;
    let (mut total, mut distinct) = (0usize, 0usize);
    for index in 0..100 {
        let sample = generate(&cfg, Split::Val, index);
        let label = sample.label.as_raw();
        let pixels = sample.image.as_raw();
        for obj in &sample.objects {
            let in_mask = |x: usize, y: usize| obj.mask[y * n + x] == 1;
            let (mut inside, mut outside) = (([0.0f64; 3], 0.0), ([0.0f64; 3], 0.0));
            for y in 0..n {
                for x in 0..n {
                    let p = y * n + x;
                    let touches = (x > 0 && in_mask(x - 1, y))
                        || (x + 1 < n && in_mask(x + 1, y))
                        || (y > 0 && in_mask(x, y - 1))
                        || (y + 1 < n && in_mask(x, y + 1));
                    let acc = if in_mask(x, y) {
                        &mut inside
                    } else if touches && label[p] == IGNORE_INDEX {
                        &mut outside
                    } else {
                        continue;
                    };
                    for (a, &v) in acc.0.iter_mut().zip(&pixels[p * 3..p * 3 + 3]) {
                        *a += v as f64;
                    }
                    acc.1 += 1.0;
                }
            }
            if outside.1 == 0.0 {
                continue;
            }
            let dist = (0..3)
                .map(|i| (inside.0[i] / inside.1 - outside.0[i] / outside.1).powi(2))
                .sum::<f64>()
                .sqrt();
            total += 1;
            distinct += usize::from(dist > 40.0);
        }
    }
    let share = distinct as f64 / total as f64;
    eprintln!("{distinct} of {total} objects contrast with their surroundings");
    assert!(share > 0.9, "only {share:.3} of objects stand out");
}

#[test]
fn all_classes_appear() {
    let cfg = SynthConfig::default();
    let mut counts = [0usize; NUM_CLASSES];
    for index in 0..200 {
        for obj in generate(&cfg, Split::Train, index).objects {
            counts[obj.class] += 1;
        }
    }
    assert!(counts.iter().all(|&c| c > 0), "class counts {counts:?}");
}

#[test]
fn area_ranges_cover_coco_buckets() {
    let cfg = SynthConfig::default();
    let mut ranges = [0usize; 3];
    let mut classes = [0usize; NUM_CLASSES];
    for index in 0..500 {
        for obj in generate(&cfg, Split::Train, index).objects {
            ranges[area_range(obj.area)] += 1;
            classes[obj.class] += 1;
        }
    }
    let total: usize = ranges.iter().sum();
    let frac = ranges.map(|r| r as f64 / total as f64);
    eprintln!(
        "{total} objects: small {:.3} medium {:.3} large {:.3}; classes {classes:?}",
        frac[0], frac[1], frac[2]
    );
    assert!(
        frac[0] > 0.3 && frac[1] > 0.2 && frac[2] >= 0.03,
        "{frac:?}"
    );
}
