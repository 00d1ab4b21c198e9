//! The fast ops against candle's own, values and gradients.

use candle_core::{Device, Tensor, Var};
use data::Rng;

use super::*;

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest absolute difference relative to the largest reference magnitude.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = w.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    g.iter()
        .zip(&w)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    assert!(e < 1e-4, "{what}: relative error {e}");
}

/// Asserts that the fast and the reference gradient stores agree on each
/// named variable, and that `x` has a gradient exactly when `input_grad`.
fn assert_gradients<N: std::fmt::Display>(
    case: &str,
    (gf, gr): (
        &candle_core::backprop::GradStore,
        &candle_core::backprop::GradStore,
    ),
    checked: Vec<(N, &Var)>,
    (x, input_grad): (&Var, bool),
) {
    for (name, v) in checked {
        let what = format!("{case} {name}");
        assert_close(&what, gf.get(v).unwrap(), gr.get(v).unwrap());
    }
    if input_grad {
        assert_close(
            &format!("{case} dx"),
            gf.get(x).unwrap(),
            gr.get(x).unwrap(),
        );
    } else {
        assert!(
            gf.get(x).is_none(),
            "{case}: no gradient for a detached input"
        );
    }
}

#[test]
fn conv2d_matches_candle_values_and_gradients() {
    let mut rng = Rng::new(7);
    // (n, cin, h, w, cout, k, stride, [top, bottom, left, right])
    let cases = [
        (2, 3, 8, 8, 4, 3, 1, [1, 1, 1, 1]),
        (3, 2, 7, 9, 5, 3, 2, [1, 1, 1, 1]),
        (2, 4, 8, 8, 3, 3, 2, [0, 1, 0, 1]),
        (1, 3, 5, 6, 2, 2, 1, [0, 1, 0, 1]),
        (2, 5, 6, 6, 4, 2, 1, [0, 1, 0, 1]),
        (3, 4, 8, 8, 6, 1, 2, [0, 0, 0, 0]),
        (2, 4, 5, 7, 3, 1, 1, [0, 0, 0, 0]),
        (2, 3, 9, 9, 4, 3, 1, [0, 0, 0, 0]),
        (4, 2, 11, 10, 3, 3, 2, [1, 1, 0, 1]),
        (1, 1, 4, 4, 1, 4, 1, [1, 2, 1, 2]),
        (5, 3, 6, 5, 2, 3, 3, [2, 0, 1, 1]),
        // Kernels wider than the stride (im2col through column phases):
        // odd widths, phases of unequal length, padding on one side only.
        (2, 3, 10, 11, 4, 5, 3, [2, 1, 1, 2]),
        (2, 2, 9, 13, 3, 4, 2, [1, 2, 0, 3]),
        (2, 2, 1, 1, 3, 5, 1, [2, 2, 2, 2]),
        (2, 2, 2, 1, 3, 5, 1, [2, 2, 2, 2]),
        // Eight or more input channels at stride 1 on wide maps: the direct path.
        (2, 8, 16, 16, 5, 3, 1, [1, 1, 1, 1]),
        (3, 9, 5, 40, 4, 3, 1, [0, 1, 2, 1]),
        (1, 8, 6, 30, 3, 2, 1, [0, 1, 1, 0]),
        (2, 10, 8, 36, 4, 3, 1, [0, 0, 0, 0]),
        (2, 8, 3, 40, 6, 3, 1, [2, 0, 0, 2]),
        // Whole register blocks of 8 output channels and 3 vectors, small
        // maps whose weight gradient runs over groups of images, 64 channels.
        (3, 16, 12, 20, 16, 3, 1, [1, 1, 1, 1]),
        (5, 24, 8, 8, 40, 3, 1, [1, 1, 1, 1]),
        (2, 64, 8, 8, 64, 3, 1, [1, 1, 1, 1]),
        (3, 16, 7, 9, 12, 2, 1, [0, 1, 0, 1]),
        // 16 or more channels in and out at stride 1, 3×3 (the 16-channel
        // rows above too): Winograd's transforms (forward and input
        // gradient, and the weight gradient with more than 16 output
        // channels), with an even and an odd number of output rows, tile
        // rows of more than one vector, "valid" padding (its input
        // gradient pads by 2).
        (2, 32, 6, 10, 40, 3, 1, [1, 1, 1, 1]),
        (1, 32, 36, 36, 33, 3, 1, [1, 1, 1, 1]),
        (2, 36, 14, 14, 32, 3, 1, [0, 0, 0, 0]),
        (2, 32, 7, 8, 32, 3, 1, [1, 1, 1, 1]),
        // ... and 2×2 kernels (Keras "same" pads after; "valid" makes an
        // input gradient of odd size, which stays direct).
        (2, 32, 8, 8, 40, 2, 1, [0, 1, 0, 1]),
        (2, 40, 9, 9, 32, 2, 1, [0, 0, 0, 0]),
        // The gemm-shaped weight gradient: blocks of 32 and 16 output
        // channels with masked tails, input channels in blocks with remainders.
        (2, 20, 9, 9, 36, 2, 1, [0, 1, 0, 1]),
        (2, 10, 6, 7, 20, 3, 1, [1, 1, 1, 1]),
        (2, 7, 5, 11, 50, 3, 1, [1, 1, 1, 1]),
        // ... and where it does not (padding as wide as the kernel), or only
        // with AVX-512 (small map).
        (2, 8, 4, 4, 3, 3, 1, [3, 0, 1, 1]),
        (2, 8, 8, 8, 5, 3, 1, [1, 1, 1, 1]),
        // Stride 2 over eight or more input channels: phase planes. Keras
        // "same" (padding after), ResNet's shapes, odd sizes, padding before,
        // 2×2 and 4×4 kernels, few output channels and masked tails.
        (2, 8, 8, 8, 12, 3, 2, [0, 1, 0, 1]),
        (3, 9, 9, 7, 5, 3, 2, [1, 1, 1, 1]),
        (2, 16, 32, 32, 32, 3, 2, [0, 1, 0, 1]),
        (2, 32, 16, 16, 64, 3, 2, [0, 1, 0, 1]),
        (2, 8, 7, 9, 16, 2, 2, [0, 1, 0, 1]),
        (2, 10, 10, 10, 20, 4, 2, [1, 2, 1, 2]),
        (2, 12, 6, 7, 40, 3, 2, [2, 0, 2, 1]),
        (2, 8, 9, 9, 50, 3, 2, [1, 1, 1, 1]),
        (2, 8, 8, 8, 3, 3, 2, [0, 1, 0, 1]),
        (2, 8, 5, 5, 6, 2, 2, [0, 1, 1, 0]),
        // 1×1 at stride 2 (ResNet's projection shortcuts): the odd phases get no gradient.
        (2, 16, 32, 32, 32, 1, 2, [0, 0, 0, 0]),
        (2, 8, 7, 9, 12, 1, 2, [0, 0, 0, 0]),
        (2, 8, 6, 6, 3, 1, 2, [0, 0, 0, 0]),
    ];
    for (n, cin, h, w, cout, k, stride, pad) in cases {
        let x = Var::from_tensor(&random(&[n, cin, h, w], &mut rng)).unwrap();
        let wt = Var::from_tensor(&random(&[cout, cin, k, k], &mut rng)).unwrap();
        let b = Var::from_tensor(&random(&[cout], &mut rng)).unwrap();
        // Every other case with the fused ReLU.
        let relu = (h + w + k) % 2 == 0;
        let fast = conv2d_act(&x, &wt, Some(&b), stride, pad, true, relu).unwrap();
        let reference = conv2d_reference(&x, &wt, Some(&b), stride, pad).unwrap();
        let reference = if relu {
            reference.relu().unwrap()
        } else {
            reference
        };
        let case = format!("n{n} c{cin} {h}x{w} o{cout} k{k} s{stride} {pad:?} relu={relu}");
        assert_close(&format!("{case} forward"), &fast, &reference);
        let r = random(reference.dims(), &mut rng);
        let gf = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&reference * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("dx", &x), ("dw", &wt), ("db", &b)] {
            assert_close(
                &format!("{case} {name}"),
                gf.get(v).unwrap(),
                gr.get(v).unwrap(),
            );
        }
    }
}

#[test]
fn inference_convolution_with_a_residual_matches_candle() {
    let mut rng = Rng::new(41);
    // Direct at strides 1 and 2, im2col (few channels), 1×1.
    for (n, cin, h, w, cout, k, stride, pad) in [
        (2, 16, 8, 8, 16, 3, 1, [1, 1, 1, 1]),
        (2, 8, 9, 7, 12, 3, 2, [1, 1, 1, 1]),
        (2, 2, 6, 6, 3, 3, 1, [1, 1, 1, 1]),
        (2, 4, 5, 5, 6, 1, 1, [0, 0, 0, 0]),
    ] {
        let x = random(&[n, cin, h, w], &mut rng);
        let wt = random(&[cout, cin, k, k], &mut rng);
        let b = random(&[cout], &mut rng);
        let y = conv2d_reference(&x, &wt, Some(&b), stride, pad).unwrap();
        let r = random(y.dims(), &mut rng);
        let fast = conv2d_add_relu_inference(&x, &wt, &b, (stride, pad), &r).unwrap();
        let reference = (&y + &r).unwrap().relu().unwrap();
        assert_close(
            &format!("n{n} c{cin} {h}x{w} k{k} s{stride}"),
            &fast,
            &reference,
        );
    }
}

#[test]
fn conv2d_without_input_grad_and_with_strided_input() {
    let mut rng = Rng::new(3);
    let x = random(&[3, 4, 6, 5], &mut rng);
    let wt = Var::from_tensor(&random(&[2, 4, 3, 3], &mut rng)).unwrap();
    let pad = [1, 1, 1, 1];
    // The input does not track gradients: only the kernel and bias get one.
    let y = conv2d(&x, &wt, None, 1, pad, false).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let yr = conv2d_reference(&x, &wt, None, 1, pad).unwrap();
    let gr = yr.sum_all().unwrap().backward().unwrap();
    assert_close("no-bias forward", &y, &yr);
    assert_close("dw", grads.get(&wt).unwrap(), gr.get(&wt).unwrap());
    // A transposed (non-contiguous) input.
    let xt = x.transpose(2, 3).unwrap();
    assert!(!xt.is_contiguous());
    let y = conv2d(&xt, &wt, None, 2, [0, 1, 1, 1], true).unwrap();
    let yr = conv2d_reference(&xt, &wt, None, 2, [0, 1, 1, 1]).unwrap();
    assert_close("transposed input", &y, &yr);
}

#[test]
fn batch_norm_matches_candle_values_stats_and_gradients() {
    let mut rng = Rng::new(11);
    for shape in [
        vec![4, 3, 5, 7],
        vec![2, 16, 8, 8],
        vec![8, 10],
        vec![3, 5, 1, 1],
        vec![1, 2, 3, 3],
    ] {
        for relu in [false, true] {
            let c = shape[1];
            // Shifted, scaled input so the statistics are not trivial.
            let x = Var::from_tensor(&((random(&shape, &mut rng) * 3.0).unwrap() + 0.5).unwrap())
                .unwrap();
            let gamma = Var::from_tensor(&random(&[c], &mut rng)).unwrap();
            let beta = Var::from_tensor(&random(&[c], &mut rng)).unwrap();
            let (y, mean, var) = batch_norm_train(&x, &gamma, &beta, 1e-3, relu).unwrap();
            let (yr, mean_r, var_r) =
                batch_norm_train_reference(&x, &gamma, &beta, 1e-3, relu).unwrap();
            let shape = format!("{shape:?} relu={relu}");
            assert_close(&format!("{shape:?} y"), &y, &yr);
            assert_close(&format!("{shape:?} mean"), &mean, &mean_r);
            assert_close(&format!("{shape:?} var"), &var, &var_r);
            let r = random(y.dims(), &mut rng);
            let gf = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("dx", &x), ("dgamma", &gamma), ("dbeta", &beta)] {
                assert_close(
                    &format!("{shape:?} {name}"),
                    gf.get(v).unwrap(),
                    gr.get(v).unwrap(),
                );
            }
        }
    }
}

#[test]
fn fused_conv_batch_norm_matches_candle_values_stats_and_gradients() {
    let mut rng = Rng::new(13);
    // (n, cin, h, w, cout, k, stride, pad, input_grad)
    let cases = [
        (2, 16, 12, 12, 16, 3, 1, [1, 1, 1, 1], true),
        (3, 8, 8, 8, 12, 3, 1, [1, 1, 1, 1], true),
        (2, 3, 9, 7, 5, 3, 1, [1, 1, 1, 1], false),
        (2, 6, 9, 9, 4, 3, 2, [1, 1, 1, 1], true),
        (3, 5, 6, 6, 7, 2, 1, [0, 1, 0, 1], true),
        (2, 16, 12, 12, 32, 3, 2, [0, 1, 0, 1], true),
        (3, 8, 9, 7, 12, 3, 2, [1, 1, 1, 1], false),
        // Winograd's path (32 channels): the statistics see valid positions only.
        (2, 32, 8, 8, 32, 3, 1, [1, 1, 1, 1], true),
    ];
    for (i, (n, cin, h, w, cout, k, stride, pad, input_grad)) in cases.into_iter().enumerate() {
        let relu = i % 2 == 0;
        let x = Var::from_tensor(&random(&[n, cin, h, w], &mut rng)).unwrap();
        let wt = Var::from_tensor(&random(&[cout, cin, k, k], &mut rng)).unwrap();
        let b = Var::from_tensor(&random(&[cout], &mut rng)).unwrap();
        let gamma = Var::from_tensor(&random(&[cout], &mut rng)).unwrap();
        let beta = Var::from_tensor(&random(&[cout], &mut rng)).unwrap();
        let xin = if input_grad {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let (z, mean, var) = conv_bn_train(
            &xin,
            &wt,
            &b,
            (&gamma, &beta),
            stride,
            pad,
            input_grad,
            1e-3,
            relu,
        )
        .unwrap();
        let y = conv2d_reference(&xin, &wt, Some(&b), stride, pad).unwrap();
        let (zr, mean_r, var_r) =
            batch_norm_train_reference(&y, &gamma, &beta, 1e-3, relu).unwrap();
        let case = format!("case {i} relu={relu}");
        assert_close(&format!("{case} z"), &z, &zr);
        assert_close(&format!("{case} mean"), &mean, &mean_r);
        assert_close(&format!("{case} var"), &var, &var_r);
        let r = random(z.dims(), &mut rng);
        let gf = (&z * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&zr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let checked = vec![("dw", &wt), ("dgamma", &gamma), ("dbeta", &beta)];
        assert_gradients(&case, (&gf, &gr), checked, (&x, input_grad));
        // The bias before a BatchNorm has no effect: its gradient is zero up
        // to rounding on both paths.
        let db = gf.get(&b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(db.to_scalar::<f32>().unwrap() < 1e-4, "{case} db");
    }
}

#[test]
fn convolution_of_an_input_normalised_as_it_loads_matches_the_normalised_values() {
    use conv::{backward_values, forward_values, Dy, Geom, Input};
    let mut rng = Rng::new(31);
    let values = |n: usize, rng: &mut Rng| -> Vec<f32> {
        (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    };
    // (n, cin, h, w, cout, k, stride, pad): direct at strides 1 and 2, im2col, 1×1.
    for (n, cin, h, w, cout, k, stride, pad) in [
        (2, 8, 7, 9, 5, 3, 1, [1, 1, 1, 1]),
        (2, 8, 8, 7, 6, 3, 2, [0, 1, 1, 1]),
        (2, 3, 6, 6, 4, 3, 1, [1, 1, 1, 1]),
        (2, 4, 5, 5, 3, 1, 1, [0, 0, 0, 0]),
    ] {
        let g = Geom::new(&[n, cin, h, w], &[cout, cin, k, k], stride, pad).unwrap();
        let (v, wt, b) = (
            values(n * cin * h * w, &mut rng),
            values(cout * cin * k * k, &mut rng),
            values(cout, &mut rng),
        );
        let (scale, shift) = (values(cin, &mut rng), values(cin, &mut rng));
        let plane = h * w;
        let normalised: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &x)| (x * scale[i / plane % cin] + shift[i / plane % cin]).max(0.0))
            .collect();
        let lazy = Input::Normalized {
            v: &v,
            scale: &scale,
            shift: &shift,
            mask: None,
        };
        let case = format!("n{n} c{cin} {h}x{w} o{cout} k{k} s{stride}");
        let (y, _) = forward_values(&g, lazy, &wt, &b, false, false).unwrap();
        let (yr, _) = forward_values(&g, Input::Plain(&normalised), &wt, &b, false, false).unwrap();
        let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
        assert_close(&format!("{case} forward"), &t(y.clone()), &t(yr));
        let dy = values(y.len(), &mut rng);
        let (dx, dw, db) = backward_values(&g, lazy, &wt, Dy::Slice(&dy), true, None).unwrap();
        let (dxr, dwr, dbr) = backward_values(
            &g,
            Input::Plain(&normalised),
            &wt,
            Dy::Slice(&dy),
            true,
            None,
        )
        .unwrap();
        assert_close(&format!("{case} dx"), &t(dx.unwrap()), &t(dxr.unwrap()));
        assert_close(&format!("{case} dw"), &t(dw), &t(dwr));
        assert_close(&format!("{case} db"), &t(db), &t(dbr));
    }
}

/// One conv + BN layer's variables: kernel, bias, gamma, beta.
type LayerVars = (Var, Var, Var, Var);

fn layer_vars(cin: usize, cout: usize, k: usize, rng: &mut Rng) -> LayerVars {
    let mut v = |shape: &[usize]| Var::from_tensor(&random(shape, rng)).unwrap();
    (v(&[cout, cin, k, k]), v(&[cout]), v(&[cout]), v(&[cout]))
}

/// `(n, cin, h, w, [(channels, stride)] per block, input_grad, dropout)`.
type BlockCase = (
    usize,
    usize,
    usize,
    usize,
    &'static [(usize, usize)],
    bool,
    Option<f32>,
);

#[test]
fn residual_blocks_match_their_layers_composed_from_candle_ops() {
    let mut rng = Rng::new(29);
    // Identity blocks at odd sizes, projection blocks (stride 2, 1×1 shortcut) as in
    // ResNet's stacks, and an input that needs no gradient.
    let cases: [BlockCase; 7] = [
        (3, 8, 7, 9, &[(8, 1)], true, None),
        // Too few channels for the direct kernels: im2col + gemm inside.
        (2, 4, 6, 5, &[(4, 1), (6, 2)], true, None),
        (
            2,
            16,
            8,
            8,
            &[(16, 1), (16, 1), (32, 2), (32, 1)],
            true,
            None,
        ),
        (2, 8, 9, 7, &[(12, 2)], true, None),
        (2, 8, 5, 6, &[(8, 1), (8, 1)], false, None),
        // Dropout between the layers (ResNet's `-dropout` models).
        (2, 16, 8, 8, &[(16, 1), (32, 2)], true, Some(0.3)),
        (2, 4, 6, 6, &[(4, 1)], true, Some(0.5)),
    ];
    for (case_no, (n, cin, h, w, shape, input_grad, rate)) in cases.into_iter().enumerate() {
        let x = Var::from_tensor(&random(&[n, cin, h, w], &mut rng)).unwrap();
        let mut vars = Vec::new();
        let mut c = cin;
        for &(cout, stride) in shape {
            let shortcut = (stride != 1).then(|| {
                let mut v = |shape: &[usize]| Var::from_tensor(&random(shape, &mut rng)).unwrap();
                (v(&[cout, c, 1, 1]), v(&[cout]))
            });
            vars.push((
                layer_vars(c, cout, 3, &mut rng),
                layer_vars(cout, cout, 3, &mut rng),
                stride,
                shortcut,
            ));
            c = cout;
        }
        let xin = if input_grad {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        // Keras "same" padding of a 3×3 kernel: 1 each side at stride 1,
        // after only at stride 2 on even sizes.
        let pad = |len: usize, stride: usize| -> (usize, usize) {
            let total = ((len.div_ceil(stride) - 1) * stride + 3).saturating_sub(len);
            (total / 2, total - total / 2)
        };
        let mut blocks = Vec::new();
        let (mut hh, mut ww) = (h, w);
        for (l1, l2, stride, sc) in &vars {
            let ((t, b), (l, r)) = (pad(hh, *stride), pad(ww, *stride));
            let (h2, w2) = (hh.div_ceil(*stride), ww.div_ceil(*stride));
            blocks.push(BlockLayers {
                first: ConvBnLayer {
                    w: &l1.0,
                    bias: &l1.1,
                    gamma: &l1.2,
                    beta: &l1.3,
                    stride: *stride,
                    pad: [t, b, l, r],
                },
                second: ConvBnLayer {
                    w: &l2.0,
                    bias: &l2.1,
                    gamma: &l2.2,
                    beta: &l2.3,
                    stride: 1,
                    pad: [1, 1, 1, 1],
                },
                shortcut: sc
                    .as_ref()
                    .map(|(w, b)| (w.as_tensor(), b.as_tensor(), *stride, [0; 4])),
                dropout: rate.map(|p| (p, 1000 * case_no as u64 + blocks.len() as u64)),
            });
            (hh, ww) = (h2, w2);
        }
        let (z, stats) = residual_blocks_train(&xin, &blocks, 1e-3)
            .unwrap()
            .expect("the fused blocks run on the CPU");
        // The same with candle's own ops.
        let mut zr = xin.clone();
        let mut stats_r = Vec::new();
        for (blk, (l1, l2, stride, sc)) in blocks.iter().zip(&vars) {
            let y = conv2d_reference(&zr, &l1.0, Some(&l1.1), *stride, blk.first.pad).unwrap();
            let (hr, m1, v1) = batch_norm_train_reference(&y, &l1.2, &l1.3, 1e-3, true).unwrap();
            let hr = match blk.dropout {
                Some((p, seed)) => dropout_reference(&hr, p, seed).unwrap(),
                None => hr,
            };
            let y = conv2d_reference(&hr, &l2.0, Some(&l2.1), 1, [1; 4]).unwrap();
            let (yr, m2, v2) = batch_norm_train_reference(&y, &l2.2, &l2.3, 1e-3, false).unwrap();
            let s = match sc {
                Some((w, b)) => conv2d_reference(&zr, w, Some(b), *stride, [0; 4]).unwrap(),
                None => zr.clone(),
            };
            zr = (&s + &yr).unwrap().relu().unwrap();
            stats_r.extend([(m1, v1), (m2, v2)]);
        }
        let case = format!("blocks {n}x{cin}x{h}x{w} {shape:?}");
        assert_close(&format!("{case} z"), &z, &zr);
        assert_eq!(stats.len(), stats_r.len());
        for (i, ((m, v), (mr, vr))) in stats.iter().zip(&stats_r).enumerate() {
            assert_close(&format!("{case} mean {i}"), m, mr);
            assert_close(&format!("{case} var {i}"), v, vr);
        }
        let r = random(z.dims(), &mut rng);
        let gf = (&z * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&zr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut checked: Vec<(String, &Var)> = Vec::new();
        for (k, (l1, l2, _, sc)) in vars.iter().enumerate() {
            for (name, v) in [("dw1", &l1.0), ("dgamma1", &l1.2), ("dbeta1", &l1.3)] {
                checked.push((format!("block {k} {name}"), v));
            }
            for (name, v) in [("dw2", &l2.0), ("dgamma2", &l2.2), ("dbeta2", &l2.3)] {
                checked.push((format!("block {k} {name}"), v));
            }
            if let Some((w, b)) = sc {
                checked.push((format!("block {k} shortcut dw"), w));
                checked.push((format!("block {k} shortcut db"), b));
            }
        }
        assert_gradients(&case, (&gf, &gr), checked, (&x, input_grad));
    }
}

#[test]
fn conv_relu_pool_matches_candle_values_and_gradients() {
    let mut rng = Rng::new(37);
    // (n, cin, h, w, cout, k, pad, input_grad): simple-cnn's shape (direct
    // kernels), odd sizes (the pool drops the last row and column), few
    // channels (im2col), no input gradient.
    for (n, cin, h, w, cout, k, pad, input_grad) in [
        (2, 32, 10, 10, 16, 3, [0, 0, 0, 0], true),
        (3, 8, 9, 7, 5, 3, [1, 1, 1, 1], true),
        (2, 3, 8, 8, 4, 3, [0, 0, 0, 0], false),
        (2, 4, 7, 6, 3, 2, [0, 1, 0, 1], true),
    ] {
        let x = Var::from_tensor(&random(&[n, cin, h, w], &mut rng)).unwrap();
        let wt = Var::from_tensor(&random(&[cout, cin, k, k], &mut rng)).unwrap();
        let b = Var::from_tensor(&random(&[cout], &mut rng)).unwrap();
        let xin = if input_grad {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let fast = conv2d_relu_pool(&xin, &wt, &b, 1, pad, input_grad).unwrap();
        let y = conv2d_reference(&xin, &wt, Some(&b), 1, pad).unwrap();
        let reference = max_pool2d_reference(&y.relu().unwrap(), 2).unwrap();
        let case = format!("n{n} c{cin} {h}x{w} o{cout} k{k}");
        assert_close(&format!("{case} forward"), &fast, &reference);
        let r = random(reference.dims(), &mut rng);
        let gf = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&reference * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let checked = vec![("dw", &wt), ("db", &b)];
        assert_gradients(&case, (&gf, &gr), checked, (&x, input_grad));
    }
}

#[test]
fn max_pool_matches_candle_values_and_gradients() {
    let mut rng = Rng::new(5);
    for (shape, k) in [([2, 3, 8, 8], 2), ([1, 2, 7, 9], 2), ([2, 2, 9, 6], 3)] {
        let x = Var::from_tensor(&random(&shape, &mut rng)).unwrap();
        let y = max_pool2d(&x, k).unwrap();
        let yr = max_pool2d_reference(&x, k).unwrap();
        assert_close(&format!("{shape:?} forward"), &y, &yr);
        assert_close(
            &format!("{shape:?} candle forward"),
            &y,
            &x.max_pool2d(k).unwrap(),
        );
        let r = random(yr.dims(), &mut rng);
        let gf = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            &format!("{shape:?} dx"),
            gf.get(&x).unwrap(),
            gr.get(&x).unwrap(),
        );
    }
}

#[test]
fn dense_matches_candle_values_and_gradients() {
    let mut rng = Rng::new(11);
    // (n, in, out): tiny, one sample, and large enough for threaded gemms.
    for (n, fan_in, out) in [(3, 5, 4), (1, 7, 2), (32, 300, 40), (17, 64, 10)] {
        let x = Var::from_tensor(&random(&[n, fan_in], &mut rng)).unwrap();
        let w = Var::from_tensor(&random(&[out, fan_in], &mut rng)).unwrap();
        let b = Var::from_tensor(&random(&[out], &mut rng)).unwrap();
        let case = format!("dense {n}x{fan_in}->{out}");
        let y = dense(&x, &w, &b).unwrap();
        let yr = dense_reference(&x, &w, &b).unwrap();
        assert_close(&format!("{case} forward"), &y, &yr);
        let r = random(yr.dims(), &mut rng);
        let gf = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_gradients(&case, (&gf, &gr), vec![("dw", &w), ("db", &b)], (&x, true));
        // With a slot, the weight's gradient lands there, not in the store.
        let slot = GradSlot::default();
        let ys = dense_with_slot(&x, &w, &b, &slot).unwrap();
        let gs = (&ys * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            gs.get(&w).is_none(),
            "{case}: the weight's gradient went to the store"
        );
        let Taken::Held(held) = slot.take().unwrap() else {
            panic!("{case}: the slot does not hold dW");
        };
        assert_close(&format!("{case} slot dw"), &held, gr.get(&w).unwrap());
        assert_close(
            &format!("{case} slot db"),
            gs.get(&b).unwrap(),
            gr.get(&b).unwrap(),
        );
        assert!(matches!(slot.take().unwrap(), Taken::Empty));
        // Bound to memory, the op reads the weight from there (not from the
        // tensor, here zeros) and writes dW there: the same values as the
        // reference on those weights.
        let bound: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let mut dw = vec![f32::NAN; bound.len()];
        let zeros = Var::from_tensor(&w.zeros_like().unwrap()).unwrap();
        // SAFETY: both buffers outlive the binding and are not touched
        // until `unbind`.
        unsafe { slot.bind(bound.as_ptr(), dw.as_mut_ptr(), bound.len()) }.unwrap();
        let yb = dense_with_slot(&x, &zeros, &b, &slot).unwrap();
        let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
        slot.unbind();
        assert_close(&format!("{case} bound forward"), &yb, &yr);
        assert!(matches!(slot.take().unwrap(), Taken::Written));
        let dw = Tensor::from_vec(dw, w.dims(), &Device::Cpu).unwrap();
        assert_close(&format!("{case} bound dw"), &dw, gr.get(&w).unwrap());
        assert_close(
            &format!("{case} bound dx"),
            gb.get(&x).unwrap(),
            gr.get(&x).unwrap(),
        );
        // A binding of the wrong length is an error, not a read past it.
        // SAFETY: as above; the op refuses before touching either.
        let mut one = [0f32];
        unsafe { slot.bind(bound.as_ptr(), one.as_mut_ptr(), 1) }.unwrap();
        assert!(dense_with_slot(&x, &zeros, &b, &slot).is_err());
        slot.unbind();
    }
    // Shapes that do not fit are an error, not a panic.
    let x = random(&[2, 3], &mut rng);
    assert!(dense(&x, &random(&[4, 5], &mut rng), &random(&[4], &mut rng)).is_err());
    assert!(dense(&x, &random(&[4, 3], &mut rng), &random(&[3], &mut rng)).is_err());
}

#[test]
fn relu_and_inference_batch_norm_match_candle() {
    let mut rng = Rng::new(13);
    let x = Var::from_tensor(&random(&[3, 4, 5, 6], &mut rng)).unwrap();
    let y = relu(&x).unwrap();
    let yr = x.relu().unwrap();
    assert_close("relu", &y, &yr);
    let r = random(y.dims(), &mut rng);
    let gf = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close("relu dx", gf.get(&x).unwrap(), gr.get(&x).unwrap());
    let b = Var::from_tensor(&random(&[3, 4, 5, 6], &mut rng)).unwrap();
    let y = add_relu(&x, &b).unwrap();
    let yr = (x.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
    assert_close("add-relu", &y, &yr);
    let gf = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for v in [&x, &b] {
        assert_close("add-relu grad", gf.get(v).unwrap(), gr.get(v).unwrap());
    }
    for shape in [vec![3, 4, 5, 6], vec![7, 4]] {
        let x = Var::from_tensor(&random(&shape, &mut rng)).unwrap();
        let [gamma, beta, mean] =
            [0, 1, 2].map(|_| Var::from_tensor(&random(&[4], &mut rng)).unwrap());
        let var = (random(&[4], &mut rng).abs().unwrap() + 0.1).unwrap();
        for relu in [false, true] {
            let y = batch_norm_eval(&x, &gamma, &beta, &mean, &var, 1e-3, relu).unwrap();
            let yr = batch_norm_eval_reference(&x, &gamma, &beta, &mean, &var, 1e-3, relu).unwrap();
            assert_close("bn eval", &y, &yr);
            let r = random(&shape, &mut rng);
            let gf = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("dx", &x), ("dgamma", &gamma), ("dbeta", &beta)] {
                assert_close(
                    &format!("bn eval {name}"),
                    gf.get(v).unwrap(),
                    gr.get(v).unwrap(),
                );
            }
        }
    }
}

#[test]
fn dropout_matches_reference_and_keeps_one_minus_p() {
    let mut rng = Rng::new(17);
    let x = Var::from_tensor(&random(&[5, 7, 33, 31], &mut rng)).unwrap();
    let y = dropout(&x, 0.3, 99).unwrap();
    let yr = dropout_reference(&x, 0.3, 99).unwrap();
    assert_close("dropout", &y, &yr);
    let r = random(y.dims(), &mut rng);
    let gf = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close("dropout dx", gf.get(&x).unwrap(), gr.get(&x).unwrap());
    let mask = dropout::dropout_mask(200_000, 0.3, 5);
    assert_eq!(mask, dropout::dropout_mask(200_000, 0.3, 5));
    assert_ne!(mask, dropout::dropout_mask(200_000, 0.3, 6));
    let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / 2e5;
    assert!((kept - 0.7).abs() < 0.01, "kept {kept}");
    assert!(mask
        .iter()
        .all(|&m| m == 0.0 || (m - 1.0 / 0.7).abs() < 1e-6));
}

#[test]
fn each_convolution_shape_takes_the_path_the_override_allows() {
    use crate::path::{direct_isa, kernel_path, KernelPath};
    use conv::{ConvPath, Geom};
    // resnet20's 3×3 16-channel layer, its stride-2 projection shortcut, a
    // 1×1 stride-1 convolution and the stem on 3 channels.
    let three = Geom::new(&[8, 16, 32, 32], &[16, 16, 3, 3], 1, [1, 1, 1, 1]).unwrap();
    let projection = Geom::new(&[8, 16, 32, 32], &[32, 16, 1, 1], 2, [0; 4]).unwrap();
    let one = Geom::new(&[8, 16, 8, 8], &[16, 16, 1, 1], 1, [0; 4]).unwrap();
    let stem = Geom::new(&[8, 3, 32, 32], &[16, 3, 3, 3], 1, [1, 1, 1, 1]).unwrap();
    assert_eq!(one.path(), ConvPath::Identity, "1×1 stride 1 on every path");
    let avx = direct_isa().is_some();
    let got = [three.path(), projection.path(), stem.path()];
    let want = match kernel_path() {
        KernelPath::Im2col => [ConvPath::Im2col; 3],
        _ if avx => [ConvPath::Direct; 3],
        // Without AVX-512 or AVX2: taps as gemms for stride 1 with 8+ channels.
        _ => [ConvPath::TapGemms, ConvPath::Im2col, ConvPath::Im2col],
    };
    assert_eq!(got, want, "{:?}", kernel_path());
    assert_eq!(three.path().is_direct(), want[0] != ConvPath::Im2col);
}

/// The profiling laps charge each stretch of time to the part it is marked
/// with and add every task's share into the op's total.
#[test]
fn laps_charge_each_part_its_time() {
    let laps = crate::Laps::new(["sleep", "nothing"]);
    for _ in 0..2 {
        // A running clock, as `Laps::lap` makes one when profiling.
        let mut lap = crate::Lap {
            laps: &laps,
            at: Some(std::time::Instant::now()),
            ms: [0.0; 2],
        };
        std::thread::sleep(std::time::Duration::from_millis(5));
        lap.mark(0);
        lap.mark(1);
    }
    let ms = *laps.ms.lock().unwrap();
    assert!(ms[0] >= 10.0, "{ms:?}");
    assert!(ms[1] < ms[0] / 10.0, "{ms:?}");
    // A stopped clock (not profiling) adds nothing.
    let mut idle = crate::Lap {
        laps: &laps,
        at: None,
        ms: [0.0; 2],
    };
    idle.mark(0);
    drop(idle);
    assert_eq!(*laps.ms.lock().unwrap(), ms);
}
