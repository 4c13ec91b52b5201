import re
import time
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from paddle.static.quantization import PostTrainingQuantization
from paddle.static.quantization.cal_kl_threshold import (cal_kl_threshold, expand_quantized_bins,
                                                         safe_entropy)

from yoloquant.calibration import (FixedPostTrainingQuantization, LayerDecisions, PTQSettings,
                                   SUPPORTED_ALGOS, calibration_loader, run_ptq)
from yoloquant.thresholds import (SEARCH_EXACT, _kl_candidates, kl_divergences, kl_threshold,
                                  ptf_threshold, search_candidates)
from yoloquant.errors import ConfigError, ModelError

BINS = 2048


# ------------------------------------------------------------------ helpers


def fixed_thresholds(x, algo, hist_percent=0.999):
    """Thresholds of one activation through our real overrides, without running a model."""
    ptq = FixedPostTrainingQuantization.__new__(FixedPostTrainingQuantization)
    absx = np.abs(x)
    ptq._algo = algo
    ptq._hist_percent = hist_percent
    ptq._activation_bits = 8
    ptq._histogram_bins = BINS
    ptq._quantized_weight_var_name = set()
    ptq._quantized_act_var_name = {"x"}
    ptq._searched_names = {"x"}  # read by an int8 kernel (no program here to find that out)
    ptq._zero_size_var_names = set()
    ptq._sampling_act_abs_min_max = {"x": [float(absx.min()), float(absx.max())]}
    ptq._sampling_act_histogram = {}
    ptq._quantized_var_threshold = {}
    ptq._init_sampling_act_histogram()
    hist, edges = ptq._sampling_act_histogram["x"]
    hist += np.histogram(absx, bins=edges)[0]  # what _sample_histogram does per batch
    ptq._calculate_kl_hist_threshold()
    return ptq._quantized_var_threshold["x"], edges


def upstream_kl_values(hist, candidates, bits=8):
    """KL per candidate with upstream's own P/Q construction (its loop body, per candidate)."""
    levels = 2 ** (bits - 1) - 1
    total = float(np.sum(hist))
    out = []
    for i in candidates:
        p = hist[:i].tolist()
        p[i - 1] += sum(hist[i:])
        merged = int(i / levels)
        q_levels = []
        for k in range(levels):
            end = i if k == levels - 1 else (k + 1) * merged
            q_levels.append(sum(hist[k * merged:end].tolist()))
        q = expand_quantized_bins(q_levels, p)
        out.append(safe_entropy(p, total, q, sum(q)))
    return np.array(out)


def histogram(kind, bins, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "halfnormal":
        x = np.abs(rng.normal(size=200_000))
    elif kind == "exponential":
        x = rng.exponential(size=200_000)
    elif kind == "long_tail":
        x = np.concatenate([np.abs(rng.normal(size=200_000)), rng.uniform(0, 50, 40)])
    elif kind == "zero_bins":
        x = np.abs(rng.normal(size=100_000))
        h = np.histogram(x, bins, (0, x.max()))[0]
        h[::3] = 0
        h[5::7] = 0
        return h
    elif kind == "uniform":
        x = rng.uniform(0.3, 0.7, 100_000)
    else:
        raise ValueError(kind)
    return np.histogram(x, bins, (0, x.max()))[0]


# ------------------------------------------------------------------ upstream bug (1)


def test_upstream_thresholds_ignore_the_histogram_start_ours_do_not():
    x = np.random.default_rng(0).uniform(0.3, 0.7, 400_000).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    # upstream: histogram over (abs_min, abs_max), thresholds measured from 0
    hist, edges = np.histogram(x, bins=BINS, range=(lo, hi))
    up_hist = PostTrainingQuantization._get_hist_scaling_factor(
        SimpleNamespace(_hist_percent=0.999), hist, edges)
    up_kl = cal_kl_threshold(hist, edges[1] - edges[0], 8)
    assert up_hist == pytest.approx(0.3996, abs=1e-3)  # = 0.999 * (0.7 - 0.3): all x > 0.4 clipped
    assert up_kl <= hi - lo + 1e-3 < 0.41

    ours_hist, ours_edges = fixed_thresholds(x, "hist")
    assert ours_edges[0] == 0.0
    width = hi / BINS
    assert ours_hist == pytest.approx(0.3 + 0.999 * 0.4, abs=1.5 * width)  # 0.6996
    ours_kl, _ = fixed_thresholds(x, "KL")
    assert 0.69 < ours_kl <= hi


def test_histograms_start_at_zero_and_match_upstream_when_abs_min_is_zero():
    x = np.abs(np.random.default_rng(1).normal(size=100_000))
    x[:10] = 0.0  # abs_min = 0: upstream's range is already right, results must agree
    hist, edges = np.histogram(x, bins=BINS, range=(0.0, x.max()))
    ours_kl, ours_edges = fixed_thresholds(x, "KL")
    np.testing.assert_array_equal(ours_edges, edges)
    assert ours_kl == cal_kl_threshold(hist, edges[1] - edges[0], 8)
    ours_hist, _ = fixed_thresholds(x, "hist", hist_percent=0.99)
    assert ours_hist == PostTrainingQuantization._get_hist_scaling_factor(
        SimpleNamespace(_hist_percent=0.99), hist, edges)


def test_all_zero_activation_gets_a_small_positive_threshold():
    for algo in ("KL", "hist"):
        t, _ = fixed_thresholds(np.zeros(1000, np.float32), algo)
        assert 0 < t < 1e-3


# ------------------------------------------------------------------ vectorised KL (2)


@pytest.mark.parametrize("kind", ["halfnormal", "exponential", "long_tail", "zero_bins",
                                  "uniform"])
def test_kl_threshold_equals_upstream(kind):
    hist = histogram(kind, 512)
    width = 1.0 / 512
    assert kl_threshold(hist, width, 8) == pytest.approx(cal_kl_threshold(hist, width, 8),
                                                         rel=1e-12)


def test_kl_values_equal_upstream_for_every_candidate():
    for kind in ("halfnormal", "zero_bins", "long_tail"):
        hist = histogram(kind, 512, seed=3)
        cand = _kl_candidates(hist)
        ours = kl_divergences(hist, cand, 8)
        np.testing.assert_allclose(ours, upstream_kl_values(hist, cand), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bins,bits", [(64, 8), (300, 4), (BINS, 8)])
def test_kl_threshold_equals_upstream_other_sizes(bins, bits):
    # 64 bins: fewer bins than int8 levels (upstream merges 0 bins per level but the last)
    hist = histogram("halfnormal", bins, seed=bins)
    assert kl_threshold(hist, 0.01, bits) == pytest.approx(cal_kl_threshold(hist, 0.01, bits),
                                                           rel=1e-12)


def test_kl_fallback_when_every_candidate_is_skipped():
    hist = np.zeros(BINS, np.int64)
    hist[:100] = 5  # all mass below the first candidate: upstream walks back to bin 99
    assert kl_threshold(hist, 0.5, 8) == cal_kl_threshold(hist, 0.5, 8) == 99.5 * 0.5


def test_histogram_sampling_counts_match_upstream():
    rng = np.random.default_rng(5)
    x = (rng.standard_t(3, (1, 8, 64, 64)) * 2).astype(np.float32)
    edges = np.histogram([], bins=BINS, range=(0.0, float(np.abs(x).max())))[1]
    x.reshape(-1)[:50] = edges[1:51]  # values exactly on bin edges
    counts = {}
    for cls in (PostTrainingQuantization, FixedPostTrainingQuantization):
        scope = paddle.static.Scope()
        scope.var("x").get_tensor().set(x, paddle.CPUPlace())
        ptq = cls.__new__(cls)
        ptq._scope, ptq._quantized_act_var_name, ptq._zero_size_var_names = scope, {"x"}, set()
        ptq._searched_names = {"x"}
        ptq._sampling_act_histogram = {"x": [np.zeros(BINS, np.int64), edges.copy()]}
        cls._sample_histogram(ptq)
        counts[cls] = ptq._sampling_act_histogram["x"][0]
    ours, upstream = counts[FixedPostTrainingQuantization], counts[PostTrainingQuantization]
    assert upstream.sum() == ours.sum() == x.size
    # only values on (or within float32 rounding of) an edge may land one bin over
    assert np.abs(ours - upstream).sum() <= 2 * 50 + 10, np.abs(ours - upstream).sum()


def search_thresholds(batches, loss, cls):
    """Activation threshold of one tensor after `batches` through `cls`'s mse/emd/ptf sampling step
    (upstream's PostTrainingQuantization or ours), without running a model."""
    scope = paddle.static.Scope()
    ptq = cls.__new__(cls)
    ptq._scope = scope
    ptq._activation_bits = 8
    ptq._onnx_format = True
    ptq._quantized_act_var_name = {"x"}
    ptq._searched_names = {"x"}
    ptq._quantized_threshold = {"w": [1.0]}  # weights done: only the activation is searched
    ptq._best_calibration_loss = {}
    ptq._zero_size_var_names = set()
    step = getattr(PostTrainingQuantization, f"_sample_{loss}")
    for batch in batches:
        scope.var("x").get_tensor().set(batch, paddle.CPUPlace())
        step(ptq) if cls is PostTrainingQuantization else getattr(ptq, f"_sample_{loss}")()
    return ptq._quantized_threshold["x"]


@pytest.mark.parametrize("loss", ["mse", "emd"])
def test_mse_emd_search_equals_upstream_on_small_tensors(loss):
    rng = np.random.default_rng(3)
    batches = [(rng.standard_t(3, (1, 4, 30, 30)) * s).astype(np.float32) for s in (1.0, 0.7, 1.3)]
    assert batches[0].size <= SEARCH_EXACT  # searched element by element: the same computation
    ours = search_thresholds(batches, loss, FixedPostTrainingQuantization)
    assert ours == search_thresholds(batches, loss, PostTrainingQuantization)
    assert len(search_candidates()) == 35 and search_candidates()[0] == 0.3


def test_upstream_ptf_keeps_the_last_batch_ours_the_mean_of_all():
    rng = np.random.default_rng(5)
    # one batch with a far larger range than the others, last: upstream calibrates on it alone
    batches = [(rng.standard_t(3, (1, 8, 40, 40)) * s).astype(np.float32) for s in (1.0, 0.8, 1.1, 6.0)]
    per_batch = [ptf_threshold(b) for b in batches]
    assert len(set(per_batch)) > 1
    for b, t in zip(batches, per_batch):  # the per-batch rule is upstream's, bit for bit
        assert search_thresholds([b], "ptf", PostTrainingQuantization) == t
        assert search_thresholds([b], "ptf", FixedPostTrainingQuantization) == t
    assert search_thresholds(batches, "ptf", PostTrainingQuantization) == per_batch[-1]
    ours = search_thresholds(batches, "ptf", FixedPostTrainingQuantization)
    assert ours == pytest.approx(np.mean(per_batch), rel=1e-12)
    # a power-of-two fraction of the batch abs-max, as the rule promises
    frac = per_batch[0] / float(np.abs(batches[0]).max())
    assert min(abs(frac - 2.0 ** -k) for k in range(4)) < 1e-6


def test_ptf_of_an_all_zero_tensor_is_a_small_positive_threshold():
    assert ptf_threshold(np.zeros((1, 2, 3, 3), np.float32)) == 1e-8


@pytest.mark.parametrize("loss", ["mse", "emd"])
def test_mse_emd_search_on_large_tensors_is_within_a_step_of_upstream(loss):
    rng = np.random.default_rng(4)
    # heavy-tailed like a conv input: 1.6 M elements (16 x 320 x 320), two batches
    batches = [(rng.standard_t(4, (1, 16, 320, 320)) * s).astype(np.float32) for s in (1.0, 1.2)]
    ours = search_thresholds(batches, loss, FixedPostTrainingQuantization)
    upstream = search_thresholds(batches, loss, PostTrainingQuantization)
    step = 0.02 * max(float(np.abs(b).max()) for b in batches)
    assert abs(ours - upstream) <= step + 1e-6, (ours, upstream, step)


def test_kl_threshold_is_vectorised_many_times_faster_than_upstream():
    # a ratio measured in one run, not a wall-clock bound: machine load hits both alike
    # (measured here: 200-450x; uniform keeps every candidate, the slowest case for ours)
    ours = upstream = 0.0
    for kind in ("halfnormal", "exponential", "uniform"):
        hist = histogram(kind, BINS)
        start = time.perf_counter()
        mine = kl_threshold(hist, 1.0, 8)
        ours += time.perf_counter() - start
        start = time.perf_counter()
        theirs = cal_kl_threshold(hist, 1.0, 8)
        upstream += time.perf_counter() - start
        assert mine == theirs
    assert upstream > 20 * ours, (upstream, ours)


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    """conv -> relu -> conv saved with save_inference_model; images have |x| in [0.3, 0.7]."""
    model_dir = tmp_path_factory.mktemp("fp32")
    paddle.enable_static()
    try:
        main, startup = paddle.static.Program(), paddle.static.Program()
        startup.random_seed = main.random_seed = 7  # unseeded weights made the tolerances flaky
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("image", [None, 3, 16, 16], "float32")
            y = paddle.static.nn.conv2d(x, 8, 3, padding=1)
            y = paddle.nn.functional.relu(y)
            y = paddle.static.nn.conv2d(y, 4, 3, padding=1)
        exe = paddle.static.Executor(paddle.CPUPlace())
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            exe.run(startup)
            paddle.static.save_inference_model(str(model_dir / "model"), [x], [y], exe,
                                               program=main)
    finally:
        paddle.disable_static()
    images = [np.random.default_rng(i).uniform(0.3, 0.7, (3, 16, 16)).astype(np.float32)
              for i in range(6)]
    return model_dir, images


def load_and_run(model_path, names, batches):
    """Load a saved model in a fresh scope; return its ops, the outputs and max |x| per name."""
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(paddle.static.Scope()):
            program, feeds, fetches = paddle.static.load_inference_model(
                str(model_path)[:-len(".pdmodel")], exe)
            block = program.global_block()
            names = [n for n in names if block.has_var(n)]
            outs, abs_max = [], {n: 0.0 for n in names}
            for batch in batches:
                res = exe.run(program, feed={feeds[0]: batch},
                              fetch_list=list(fetches) + names)
                outs.append(res[0])
                for n, v in zip(names, res[1:]):
                    abs_max[n] = max(abs_max[n], float(np.abs(v).max()))
        return [op.type for op in block.ops], np.concatenate(outs), abs_max
    finally:
        paddle.disable_static()


def settings(algo, **kw):
    return PTQSettings(algo=algo, batch_nums=3, hist_percent=0.999,
                       quantizable_op_type=("conv2d",), onnx_format=True, **kw)


@pytest.mark.parametrize("algo", ["avg", "hist", "KL", "mse", "ptf"])
def test_run_ptq_end_to_end(fp32_model, tmp_path, algo):
    model_dir, images = fp32_model
    loader = calibration_loader(images, "image", batch_size=2)
    assert paddle.in_dynamic_mode()
    result = run_ptq(settings(algo), loader, str(model_dir), "model.pdmodel",
                     "model.pdiparams", str(tmp_path / "q"))
    assert paddle.in_dynamic_mode()  # static mode did not leak
    assert result.model_path.endswith("model.pdmodel") and result.params_path.endswith(
        "model.pdiparams")

    batches = [np.stack(images[i:i + 2]) for i in range(0, 6, 2)]
    acts = list(result.activation_names)
    op_types, q_out, _ = load_and_run(result.model_path, [], batches)
    _, f_out, abs_max = load_and_run(model_dir / "model.pdmodel", acts, batches)
    assert "quantize_linear" in op_types and "dequantize_linear" in op_types
    # int8 simulation stays close to FP32
    assert np.abs(q_out - f_out).max() < 0.1 * np.abs(f_out).max()

    assert result.weight_names == ("conv2d_0.w_0", "conv2d_1.w_0")
    assert {"image", "relu_0.tmp_0", "conv2d_0.tmp_0"} <= set(acts)
    assert set(result.thresholds) == set(acts) | set(result.weight_names)
    for name in result.weight_names:  # channel-wise: one value per output channel
        assert len(result.thresholds[name]) in (8, 4)
        assert all(v > 0 for v in result.thresholds[name])
    for name in acts:
        assert result.thresholds[name] > 0
        if algo in ("hist", "KL"):
            assert result.thresholds[name] <= abs_max[name] * (1 + 1e-6)
    assert result.thresholds["image"] > 0.68  # the true range, not upstream's ~0.4

    ops = [(o.op_type, o.inputs, o.weights, o.outputs) for o in result.quantized_ops]
    assert ops == [("conv2d", ("image",), ("conv2d_0.w_0",), ("conv2d_0.tmp_0",)),
                   ("conv2d", ("relu_0.tmp_0",), ("conv2d_1.w_0",), ("conv2d_1.tmp_0",))]


def test_legacy_format_reports_the_same_ops(fp32_model, tmp_path):
    model_dir, images = fp32_model
    result = run_ptq(PTQSettings(algo="hist", batch_nums=3, quantizable_op_type=("conv2d",),
                                 onnx_format=False),
                     calibration_loader(images, "image", 2), str(model_dir), "model.pdmodel",
                     "model.pdiparams", str(tmp_path / "q"))
    assert [(o.inputs, o.weights) for o in result.quantized_ops] == [
        (("image",), ("conv2d_0.w_0",)), (("relu_0.tmp_0",), ("conv2d_1.w_0",))]


def test_only_quantized_op_inputs_are_searched_in_onnx_format(fp32_model, tmp_path):
    """onnx_format: a conv output (read by no int8 kernel) keeps its abs-max, a conv input gets
    the hist threshold; the legacy format searches every observed tensor, as upstream."""
    model_dir, images = fp32_model
    batches = [np.stack(images[i:i + 2]) for i in range(0, 6, 2)]
    _, _, abs_max = load_and_run(model_dir / "model.pdmodel", ["conv2d_0.tmp_0", "relu_0.tmp_0"], batches)
    found = {}
    for onnx_format in (True, False):
        found[onnx_format] = run_ptq(
            PTQSettings(algo="hist", batch_nums=3, hist_percent=0.99, quantizable_op_type=("conv2d",),
                        onnx_format=onnx_format),
            calibration_loader(images, "image", 2), str(model_dir), "model.pdmodel",
            "model.pdiparams", str(tmp_path / str(onnx_format))).thresholds
    assert found[True]["conv2d_0.tmp_0"] == pytest.approx(abs_max["conv2d_0.tmp_0"], rel=1e-6)
    assert found[False]["conv2d_0.tmp_0"] < 0.99 * abs_max["conv2d_0.tmp_0"]
    for onnx_format in (True, False):  # conv inputs are searched either way
        assert found[onnx_format]["relu_0.tmp_0"] < 0.99 * abs_max["relu_0.tmp_0"]


def test_upstream_hist_clips_the_input_on_the_same_model(fp32_model, tmp_path):
    model_dir, images = fp32_model
    loader = calibration_loader(images, "image", 2)
    ours = run_ptq(settings("hist"), loader, str(model_dir), "model.pdmodel",
                   "model.pdiparams", str(tmp_path / "q"))
    upstream = run_upstream_ptq(model_dir, loader, algo="hist", hist_percent=0.999)
    theirs = upstream._quantized_var_threshold
    assert theirs["image"] < 0.41 < 0.69 < ours.thresholds["image"]
    # relu output has abs_min = 0, where upstream's histogram was already right
    assert ours.thresholds["relu_0.tmp_0"] == pytest.approx(theirs["relu_0.tmp_0"], rel=1e-12)


def test_repeated_runs_are_independent(fp32_model, tmp_path):
    model_dir, images = fp32_model
    loader = calibration_loader(images, "image", 2)
    a = run_ptq(settings("KL"), loader, str(model_dir), "model.pdmodel", "model.pdiparams",
                str(tmp_path / "a"))
    b = run_ptq(settings("KL"), loader, str(model_dir), "model.pdmodel", "model.pdiparams",
                str(tmp_path / "b"))
    assert a.thresholds == b.thresholds


# ------------------------------------------------------------------ errors


def test_bad_algo_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        PTQSettings(algo="kl")
    for algo in SUPPORTED_ALGOS:
        assert algo in str(err.value)
    with pytest.raises(ConfigError, match="min_max"):
        PTQSettings(algo="min_max")


@pytest.mark.parametrize("kw", [dict(hist_percent=1.0), dict(batch_nums=0),
                                dict(weight_bits=4), dict(quantizable_op_type=["conv3d"]),
                                dict(weight_quantize_type="per_channel"),
                                dict(deploy_backend="tpu")])
def test_bad_settings_raise_config_error(kw):
    with pytest.raises(ConfigError):
        PTQSettings(**kw)


def test_settings_store_lists_as_tuples():
    s = PTQSettings(quantizable_op_type=["conv2d"], skip_tensor_list=["a"])
    assert s.quantizable_op_type == ("conv2d",) and s.skip_tensor_list == ("a",)
    hash(s)


def test_generator_and_missing_model_are_refused(fp32_model, tmp_path):
    model_dir, images = fp32_model
    with pytest.raises(ConfigError, match="DataLoader"):
        run_ptq(settings("avg"), iter(images), str(model_dir), "model.pdmodel",
                "model.pdiparams", str(tmp_path / "q"))
    loader = calibration_loader(images, "image", 2)
    with pytest.raises(ModelError):
        run_ptq(settings("avg"), loader, str(tmp_path / "nope"), "model.pdmodel",
                "model.pdiparams", str(tmp_path / "q"))
    with pytest.raises(ModelError, match="params"):
        run_ptq(settings("avg"), loader, str(model_dir), "model.pdmodel", "other.pdiparams",
                str(tmp_path / "q"))


def params_of(model_path, names):
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            paddle.static.load_inference_model(str(model_path)[:-len(".pdmodel")], exe)
            return {n: np.array(scope.find_var(n).get_tensor()) for n in names}
    finally:
        paddle.disable_static()


def test_before_update_keeps_convs_float_and_shifts_biases(fp32_model, tmp_path):
    model_dir, images = fp32_model
    seen = {}

    def decide(thresholds, ops):
        seen["ops"], seen["thresholds"] = ops, thresholds
        return LayerDecisions(float_weights=("conv2d_1.w_0",),
                              bias_shifts={"conv2d_0.w_0": np.arange(8, dtype=np.float32),
                                           "conv2d_1.w_0": np.ones(4, np.float32)})

    result = run_ptq(settings("avg"), calibration_loader(images, "image", 2), str(model_dir),
                     "model.pdmodel", "model.pdiparams", str(tmp_path / "q"), before_update=decide)
    assert [o.weights for o in seen["ops"]] == [("conv2d_0.w_0",), ("conv2d_1.w_0",)]
    assert seen["thresholds"]["image"] > 0.68
    # the float conv is not quantized and its bias is left alone; the int8 one's bias is shifted
    assert [o.weights for o in result.quantized_ops if o.inputs] == [("conv2d_0.w_0",)]
    assert result.bias_corrected == ("conv2d_0.w_0",)
    before = params_of(model_dir / "model.pdmodel", ["conv2d_0.b_0", "conv2d_1.b_0"])
    after = params_of(result.model_path, ["conv2d_0.b_0", "conv2d_1.b_0"])
    np.testing.assert_allclose(after["conv2d_0.b_0"], before["conv2d_0.b_0"] + np.arange(8), rtol=1e-6)
    np.testing.assert_array_equal(after["conv2d_1.b_0"], before["conv2d_1.b_0"])

    with pytest.raises(TypeError, match="LayerDecisions"):
        run_ptq(settings("avg"), calibration_loader(images, "image", 2), str(model_dir),
                "model.pdmodel", "model.pdiparams", str(tmp_path / "q2"),
                before_update=lambda thresholds, ops: ["conv2d_1.w_0"])


def program_contents(model_path):
    """(ops as (type, inputs, outputs) sorted, persistable var names) of a saved program."""
    paddle.enable_static()
    try:
        with open(model_path, "rb") as f:
            program = paddle.static.Program.parse_from_string(f.read())
        def args(names):  # the save step's output names count up within a process
            return tuple(re.sub(r"^save_infer_model/scale_(\d+)\.tmp_\d+$", r"save_infer_model/\1", n)
                         for n in names)

        ops = sorted((o.type, tuple(sorted((k, args(o.input(k))) for k in o.input_names)),
                      tuple(sorted((k, args(o.output(k))) for k in o.output_names)))
                     for o in program.global_block().ops)
        return ops, sorted(v.name for v in program.list_vars() if v.persistable)
    finally:
        paddle.disable_static()


def test_faster_ir_graph_rewrites_the_program_exactly_as_upstream(fp32_model, tmp_path, monkeypatch):
    """yoloquant.paddle_speedups: the program rewrite with the cached / assert-free IrGraph
    helpers gives the same ops, variables and parameters as Paddle's own helpers."""
    import contextlib

    from paddle.base.framework import IrGraph

    import yoloquant.calibration as calibration

    model_dir, images = fp32_model
    originals = {n: getattr(IrGraph, n) for n in ("link_to", "all_persistable_nodes")}
    results = {}
    for name, ctx in (("fast", calibration.faster_ir_graph),
                      ("upstream", contextlib.nullcontext)):
        monkeypatch.setattr(calibration, "faster_ir_graph", ctx)
        results[name] = run_ptq(settings("hist"), calibration_loader(images, "image", 2),
                                str(model_dir), "model.pdmodel", "model.pdiparams",
                                str(tmp_path / name))
    assert {n: getattr(IrGraph, n) for n in originals} == originals  # restored on exit
    fast, upstream = results["fast"], results["upstream"]
    assert program_contents(fast.model_path) == program_contents(upstream.model_path)
    names = [n for n in program_contents(fast.model_path)[1] if n not in ("feed", "fetch")]
    assert any(n.endswith("@scale") for n in names)
    a, b = params_of(fast.model_path, names), params_of(upstream.model_path, names)
    for n in names:
        np.testing.assert_array_equal(a[n], b[n])


def test_faster_ir_graph_persistable_nodes_follow_graph_edits(fp32_model):
    from paddle.base import core
    from paddle.base.framework import IrGraph

    from yoloquant.paddle_speedups import faster_ir_graph

    model_dir, _ = fp32_model
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(paddle.static.Scope()):
            program, _, _ = paddle.static.load_inference_model(str(model_dir / "model"), exe)
        graph = IrGraph(core.Graph(program.desc), for_test=True)

        def names():
            return sorted(n.name() for n in graph.all_persistable_nodes())

        reference = names()
        with faster_ir_graph():
            assert names() == reference
            added = graph.create_persistable_node("extra@scale", core.VarDesc.VarType.LOD_TENSOR,
                                                  [1], core.VarDesc.VarType.FP32)
            graph.create_var_node("plain", core.VarDesc.VarType.LOD_TENSOR, [1],
                                  core.VarDesc.VarType.FP32)
            assert names() == sorted(reference + ["extra@scale"])
            graph.safe_remove_nodes({added})
            assert names() == reference
    finally:
        paddle.disable_static()


def run_upstream_ptq(model_dir, loader, save_dir=None, **settings):
    """Paddle's own PostTrainingQuantization (onnx_format, convs only, 3 batches) on the test
    model; saved to save_dir if given."""
    paddle.enable_static()
    try:
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            ptq = PostTrainingQuantization(
                executor=paddle.static.Executor(paddle.CPUPlace()), model_dir=str(model_dir),
                model_filename="model.pdmodel", params_filename="model.pdiparams",
                data_loader=loader, batch_nums=3, scope=scope, quantizable_op_type=["conv2d"],
                onnx_format=True, **settings)
            ptq.quantize()
            if save_dir is not None:
                ptq.save_quantized_model(str(save_dir), model_filename="model.pdmodel",
                                         params_filename="model.pdiparams")
    finally:
        paddle.disable_static()
    return ptq


def upstream_quantized_output(model_dir, images, out_dir, round_type):
    """Output of upstream's avg-calibrated model (run as a float simulation) on the images."""
    run_upstream_ptq(model_dir, calibration_loader(images, "image", 2), out_dir, algo="avg",
                     round_type=round_type)
    batches = [np.stack(images[i:i + 2]) for i in range(0, 6, 2)]
    return load_and_run(out_dir / "model.pdmodel", [], batches)[1]


def test_upstream_adaround_breaks_onnx_format_models_and_is_refused(fp32_model, tmp_path):
    """round_type='adaround' writes integer weights into the scope, which the onnx_format
    program then quantizes again: the saved model's output is garbage (yolov5n: mAP 0.000 in
    Paddle's int8 runtime). PTQSettings refuses the combination and points to fine_tune.py."""
    model_dir, images = fp32_model
    batches = [np.stack(images[i:i + 2]) for i in range(0, 6, 2)]
    reference = load_and_run(model_dir / "model.pdmodel", [], batches)[1]
    rounded = upstream_quantized_output(model_dir, images, tmp_path / "round", "round")
    adarounded = upstream_quantized_output(model_dir, images, tmp_path / "adaround", "adaround")
    scale = np.abs(reference).max()
    assert np.abs(rounded - reference).max() < 0.1 * scale
    assert np.abs(adarounded - reference).max() > scale  # larger than the output itself
    with pytest.raises(ConfigError, match="fine_tune.py"):
        settings("avg", round_type="adaround")
    legacy = PTQSettings(algo="avg", round_type="adaround", onnx_format=False)
    assert legacy.round_type == "adaround"


def paddle_int8_predictor(model_file):
    """Paddle Inference on the saved int8 program, as yoloquant.runtime runs it (oneDNN int8)."""
    from yoloquant.runtime import PaddleInferenceBackend, PaddleModelFiles

    return PaddleInferenceBackend(PaddleModelFiles(model_file, model_file.with_suffix(".pdiparams")),
                                  int8=True, threads=1)


def test_float64_activations_stay_unquantized_so_paddle_inference_loads_the_model(tmp_path):
    """A concat of float64 tensors between two convs (the YOLOv6-Lite export computes its anchor
    grid in float64): upstream's PTQ gives its inputs Q/DQ pairs with float64 scales, and Paddle
    Inference refuses the saved model; ours leaves those ops float and the model runs."""
    from yoloquant.errors import ModelError as YoloModelError

    model_dir = tmp_path / "fp32"
    paddle.enable_static()
    try:
        main, startup = paddle.static.Program(), paddle.static.Program()
        startup.random_seed = main.random_seed = 7
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("image", [None, 3, 16, 16], "float32")
            y = paddle.static.nn.conv2d(x, 4, 3, padding=1)
            d = paddle.cast(y, "float64")
            z = paddle.concat([d, d * 2.0], axis=1)
            y = paddle.static.nn.conv2d(paddle.cast(z, "float32"), 4, 3, padding=1)
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(paddle.static.Scope()):
            exe.run(startup)
            paddle.static.save_inference_model(str(model_dir / "model"), [x], [y], exe, program=main)
    finally:
        paddle.disable_static()
    images = [np.random.default_rng(i).uniform(0, 1, (3, 16, 16)).astype(np.float32) for i in range(6)]
    batch = np.stack(images[:2])

    run_upstream_ptq(model_dir, calibration_loader(images, "image", 2), tmp_path / "upstream",
                     algo="avg")
    with pytest.raises(YoloModelError, match="float64"):
        paddle_int8_predictor(tmp_path / "upstream" / "model.pdmodel")

    result = run_ptq(settings("avg"), calibration_loader(images, "image", 2), str(model_dir),
                     "model.pdmodel", "model.pdiparams", str(tmp_path / "ours"))
    assert {op.op_type for op in result.quantized_ops} == {"conv2d"}
    out = paddle_int8_predictor(tmp_path / "ours" / "model.pdmodel")(batch)
    reference = load_and_run(model_dir / "model.pdmodel", [], [batch])[1]
    assert out.shape == reference.shape
    # both convs still run in 8 bits: the output is close to float, not equal to it
    err = np.abs(out - reference).max() / np.abs(reference).max()
    assert 0 < err < 0.1
