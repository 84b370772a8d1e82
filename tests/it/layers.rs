//! The adapted linear layers: forward equivalences, merge, gradients, steps.

use candle::{DType, Result, Tensor, Var};
use candle_nn::Optimizer;
use lora_mini::adapter::{
    AdaptedLinear, InnerInit, LoraConfig, LoraLinear, LoraMiniConfig, LoraMiniLinear, LowRankLayer,
    Method,
};

use crate::common::{base_linear, max_abs_diff, uniform, values};

fn mini_config(inner_init: InnerInit) -> LoraMiniConfig {
    LoraMiniConfig {
        inner_init,
        alpha: 12.0,
        ..LoraMiniConfig::new(4, 12, 10)
    }
}

#[test]
fn materialised_forward_equals_the_four_matrix_product() -> Result<()> {
    let base = base_linear(1, 48, 40, true, DType::F64)?;
    let mut config = mini_config(InnerInit::Kaiming);
    config.dropout = 0.3;
    let layer = LoraMiniLinear::new(&base, &config, "m")?;
    // Few rows take the factored path; at least min(d_in, d_out) rows in
    // inference take the merged one (W + ΔW in one gemm).
    for dims in [vec![7, 48], vec![3, 5, 48], vec![64, 48], vec![2, 30, 48]] {
        let x = uniform(2, &dims, 1.0, DType::F64)?;
        let fused = layer.forward_t(&x, false)?;
        let naive = layer.forward_unfused(&x, false)?;
        assert_eq!(fused.dims(), naive.dims());
        let d = max_abs_diff(&fused, &naive)?;
        assert!(d < 1e-12, "{dims:?}: {d}");
        // In training both paths must draw the same dropout mask for the same call.
        let calls = layer.dropout().unwrap().calls();
        let fused = layer.forward_t(&x, true)?;
        layer.dropout().unwrap().set_calls(calls);
        let naive = layer.forward_unfused(&x, true)?;
        assert!(max_abs_diff(&fused, &naive)? < 1e-12);
        // ... and dropout does change the output in training.
        assert!(max_abs_diff(&fused, &layer.forward_t(&x, false)?)? > 1e-6);
    }
    // The explicit ΔW = s·B_aux·B_in·A_in·A_aux matches too.
    let t = |v: &Var| v.as_tensor().clone();
    let delta = (layer
        .b_aux()
        .matmul(&t(layer.b_in()))?
        .matmul(&t(layer.a_in()))?
        .matmul(layer.a_aux())?
        * 3.0)?;
    assert!(max_abs_diff(&delta, &layer.delta_weight()?)? < 1e-12);
    Ok(())
}

/// The merged inference path keeps the graph: a backward from it gives the
/// trainable factors the same gradients as the factored training path.
#[test]
fn inference_forward_over_many_rows_still_reaches_the_factors() -> Result<()> {
    let base = base_linear(5, 48, 40, true, DType::F32)?;
    let layer = LoraMiniLinear::new(&base, &mini_config(InnerInit::Kaiming), "m")?;
    let x = uniform(6, &[3, 30, 48], 1.0, DType::F32)?;
    let probe = uniform(7, &[3, 30, 40], 1.0, DType::F32)?;
    let merged = (layer.forward_t(&x, false)? * &probe)?
        .sum_all()?
        .backward()?;
    // No dropout is configured, so the training forward is the same function.
    let factored = (layer.forward_t(&x, true)? * &probe)?
        .sum_all()?
        .backward()?;
    for v in [layer.a_in(), layer.b_in()] {
        let (a, b) = (merged.get(v).unwrap(), factored.get(v).unwrap());
        assert!(max_abs_diff(a, b)? < 1e-3 * (1.0 + max_abs_diff(b, &b.zeros_like()?)?));
        assert!(max_abs_diff(a, &a.zeros_like()?)? > 0.0);
    }
    Ok(())
}

#[test]
fn zero_inner_init_starts_from_the_pretrained_function() -> Result<()> {
    let base = base_linear(3, 32, 24, true, DType::F32)?;
    let x = uniform(4, &[2, 6, 32], 1.0, DType::F32)?;
    let expected = lora_mini::adapter::linear_fwd(&x, base.weight(), base.bias())?;
    let mini = LoraMiniLinear::new(&base, &mini_config(InnerInit::ZeroB), "m")?;
    let lora = LoraLinear::new(&base, &LoraConfig::new(4), "m")?;
    assert_eq!(values(&mini.forward_t(&x, false)?)?, values(&expected)?);
    assert_eq!(values(&lora.forward_t(&x, false)?)?, values(&expected)?);
    let kaiming = LoraMiniLinear::new(&base, &mini_config(InnerInit::Kaiming), "m")?;
    assert!(max_abs_diff(&kaiming.forward_t(&x, false)?, &expected)? > 1e-4);
    Ok(())
}

#[test]
fn frozen_matrices_are_seeded_kaiming_and_reproducible() -> Result<()> {
    let base = base_linear(5, 256, 128, false, DType::F32)?;
    let config = LoraMiniConfig::new(8, 64, 32);
    let a = LoraMiniLinear::new(&base, &config, "encoder.layer.0.attention.self.query")?;
    let b = LoraMiniLinear::new(&base, &config, "encoder.layer.0.attention.self.query")?;
    let other = LoraMiniLinear::new(&base, &config, "encoder.layer.0.attention.self.key")?;
    assert_eq!(a.a_aux().dims(), &[64, 256]);
    assert_eq!(a.b_aux().dims(), &[128, 32]);
    assert_eq!(a.a_in().dims(), &[8, 64]);
    assert_eq!(a.b_in().dims(), &[32, 8]);
    for (x, y) in [(a.a_aux(), b.a_aux()), (a.b_aux(), b.b_aux())] {
        let (x, y) = (values(x)?, values(y)?);
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    assert_ne!(values(a.a_aux())?, values(other.a_aux())?);
    // Kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for (t, fan_in) in [
        (a.a_aux(), 256f32),
        (a.b_aux(), 32.),
        (a.a_in().as_tensor(), 64.),
    ] {
        let v = values(t)?;
        let bound = 1.0 / fan_in.sqrt();
        assert!(v.iter().all(|x| x.abs() <= bound));
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        assert!(
            (var / (bound * bound / 3.0) - 1.0).abs() < 0.1,
            "variance {var}"
        );
    }
    assert!(values(a.b_in().as_tensor())?.iter().all(|&x| x == 0.0));
    Ok(())
}

#[test]
fn merge_and_unmerge_preserve_outputs() -> Result<()> {
    let base = base_linear(6, 64, 48, true, DType::F32)?;
    let x = uniform(7, &[4, 9, 64], 1.0, DType::F32)?;
    for method in [
        Method::LoraMini(mini_config(InnerInit::Kaiming)),
        Method::Lora(LoraConfig {
            inner_init: InnerInit::Kaiming,
            ..LoraConfig::new(4)
        }),
    ] {
        let mut layer = AdaptedLinear::new(&base, &method, "m")?;
        let before = layer.forward_t(&x, false)?;
        layer.merge()?;
        let merged = layer.forward_t(&x, false)?;
        assert!(max_abs_diff(&before, &merged)? < 1e-5, "{}", method.name());
        // Training a merged layer would silently train nothing.
        assert!(layer.forward_t(&x, true).is_err());
        layer.unmerge();
        assert_eq!(values(&layer.forward_t(&x, false)?)?, values(&before)?);
        let plain = layer.to_merged_linear()?;
        assert!(max_abs_diff(&candle::Module::forward(&plain, &x)?, &before)? < 1e-5);
    }
    Ok(())
}

/// Analytic gradients against central finite differences, in f64.
fn check_gradients(layer: &AdaptedLinear, x: &Tensor) -> Result<()> {
    let probe = uniform(11, layer.forward_t(x, false)?.dims(), 1.0, DType::F64)?;
    let loss = |layer: &AdaptedLinear| -> Result<Tensor> {
        (layer.forward_t(x, false)? * &probe)?.sum_all()
    };
    let grads = loss(layer)?.backward()?;
    let trainable = layer.trainable();
    assert!(!trainable.is_empty());
    for (role, var) in trainable {
        let analytic = grads.get(var).expect("every trainable var has a gradient");
        let analytic = analytic.flatten_all()?.to_vec1::<f64>()?;
        let original = var.as_tensor().copy()?;
        let flat = original.flatten_all()?.to_vec1::<f64>()?;
        let eps = 1e-6;
        let mut numeric = Vec::with_capacity(flat.len());
        for i in 0..flat.len() {
            let mut plus = flat.clone();
            plus[i] += eps;
            var.set(&Tensor::from_vec(plus, var.shape(), var.device())?)?;
            let lp = loss(layer)?.to_scalar::<f64>()?;
            let mut minus = flat.clone();
            minus[i] -= eps;
            var.set(&Tensor::from_vec(minus, var.shape(), var.device())?)?;
            let lm = loss(layer)?.to_scalar::<f64>()?;
            numeric.push((lp - lm) / (2.0 * eps));
        }
        var.set(&original)?;
        let diff: f64 = analytic
            .iter()
            .zip(&numeric)
            .map(|(a, n)| (a - n).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = numeric.iter().map(|n| n * n).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{role}: zero gradient");
        assert!(
            diff / norm <= 1e-4,
            "{role}: relative error {}",
            diff / norm
        );
        for (a, n) in analytic.iter().zip(&numeric) {
            assert!(
                (a - n).abs() <= 1e-4 * n.abs().max(1e-3),
                "{role}: {a} vs {n}"
            );
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let base = base_linear(8, 20, 18, true, DType::F64)?;
    let x = uniform(9, &[2, 3, 20], 1.0, DType::F64)?;
    let config = LoraMiniConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraMiniConfig::new(3, 6, 5)
    };
    check_gradients(
        &AdaptedLinear::new(&base, &Method::LoraMini(config), "m")?,
        &x,
    )?;
    let lora = LoraConfig {
        inner_init: InnerInit::Kaiming,
        ..LoraConfig::new(3)
    };
    check_gradients(&AdaptedLinear::new(&base, &Method::Lora(lora), "m")?, &x)?;
    check_gradients(&AdaptedLinear::new(&base, &Method::Full, "m")?, &x)
}

#[test]
fn one_step_moves_every_trainable_and_no_frozen_tensor() -> Result<()> {
    let base = base_linear(10, 32, 24, true, DType::F32)?;
    let x = uniform(12, &[16, 32], 1.0, DType::F32)?;
    let target = uniform(13, &[16, 24], 1.0, DType::F32)?;
    for inner_init in [InnerInit::ZeroB, InnerInit::Kaiming] {
        let layer = AdaptedLinear::new(&base, &Method::LoraMini(mini_config(inner_init)), "m")?;
        let AdaptedLinear::LoraMini(mini) = &layer else {
            unreachable!()
        };
        let frozen_values = || -> Result<Vec<Vec<f32>>> {
            [
                &mini.weight()?,
                mini.bias().unwrap(),
                mini.a_aux(),
                mini.b_aux(),
            ]
            .into_iter()
            .map(values)
            .collect()
        };
        let frozen = frozen_values()?;
        let trainable: Vec<Vec<f32>> = layer
            .trainable()
            .iter()
            .map(|(_, v)| values(v))
            .collect::<Result<_>>()?;
        let vars = layer
            .trainable()
            .into_iter()
            .map(|(_, v)| v.clone())
            .collect();
        let mut opt = candle_nn::AdamW::new_lr(vars, 1e-3)?;
        opt.backward_step(&candle_nn::loss::mse(&layer.forward_t(&x, true)?, &target)?)?;
        let frozen_after = frozen_values()?;
        for (b, a) in frozen.iter().zip(&frozen_after) {
            assert!(
                b.iter().zip(a).all(|(p, q)| p.to_bits() == q.to_bits()),
                "a frozen tensor moved"
            );
        }
        for ((role, var), before) in layer.trainable().iter().zip(&trainable) {
            // With B_in = 0, A_in's gradient is exactly zero at step 0, but
            // AdamW's weight decay still moves it.
            assert_ne!(
                &values(var)?,
                before,
                "{role} did not change ({inner_init:?})"
            );
        }
    }
    Ok(())
}

#[test]
fn trainable_counts_follow_the_formulas() -> Result<()> {
    let base = base_linear(14, 768, 3072, true, DType::F32)?;
    let mini = AdaptedLinear::new(
        &base,
        &Method::LoraMini(LoraMiniConfig::new(8, 64, 64)),
        "m",
    )?;
    assert_eq!(mini.num_trainable(), 8 * (64 + 64));
    let lora = AdaptedLinear::new(&base, &Method::Lora(LoraConfig::new(8)), "m")?;
    assert_eq!(lora.num_trainable(), 8 * (768 + 3072));
    let full = AdaptedLinear::new(&base, &Method::Full, "m")?;
    assert_eq!(full.num_trainable(), 768 * 3072 + 3072);
    assert_eq!(
        AdaptedLinear::new(&base, &Method::Frozen, "m")?.num_trainable(),
        0
    );
    Ok(())
}

#[test]
fn adapters_follow_the_base_dtype() -> Result<()> {
    let base = base_linear(15, 32, 16, true, DType::BF16)?;
    let layer = AdaptedLinear::new(&base, &Method::LoraMini(LoraMiniConfig::new(2, 8, 8)), "m")?;
    assert!(layer
        .trainable()
        .iter()
        .all(|(_, v)| v.dtype() == DType::BF16));
    let y = layer.forward_t(&uniform(16, &[3, 32], 1.0, DType::BF16)?, true)?;
    assert_eq!(y.dtype(), DType::BF16);
    let int_base = candle_nn::Linear::new(
        Tensor::zeros((4, 4), DType::U32, &candle::Device::Cpu)?,
        None,
    );
    let err = AdaptedLinear::new(&int_base, &Method::Full, "enc.q")
        .unwrap_err()
        .to_string();
    assert!(err.contains("enc.q"), "{err}");
    Ok(())
}

/// `Module::forward` trains until the registry says otherwise: with dropout
/// it draws masks (as `forward_t(.., true)` does), and after
/// `set_training(false)` it is the inference pass, in every clone.
#[test]
fn module_forward_trains_by_default_and_follows_the_registry() -> Result<()> {
    use candle::Module;
    let base = base_linear(3, 24, 16, true, DType::F32)?;
    let mut config = mini_config(InnerInit::Kaiming);
    config.dropout = 0.5;
    let layer = AdaptedLinear::new(&base, &Method::LoraMini(config), "m")?;
    let mut registry = lora_mini::adapter::AdapterRegistry::new();
    registry.register("m", &layer)?;
    let x = uniform(4, &[5, 24], 1.0, DType::F32)?;
    let inference = layer.forward_t(&x, false)?;

    assert!(layer.is_training());
    layer.set_dropout_calls(0);
    let by_default = layer.forward(&x)?;
    layer.set_dropout_calls(0);
    let training = layer.forward_t(&x, true)?;
    assert_eq!(values(&by_default)?, values(&training)?);
    assert!(
        max_abs_diff(&by_default, &inference)? > 1e-3,
        "dropout was not applied"
    );

    registry.set_training(false);
    assert!(!layer.is_training());
    assert_eq!(values(&layer.forward(&x)?)?, values(&inference)?);
    assert_eq!(layer.dropout_calls(), Some(1), "inference drew no mask");
    Ok(())
}
