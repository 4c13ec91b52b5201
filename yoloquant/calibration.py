"""Post-training calibration: Paddle's PostTrainingQuantization with two upstream bugs fixed.

`run_ptq` does what `paddleslim.quant.quant_post_static` does (same arguments, same defaults, the
same `PostTrainingQuantization` calls) but with `FixedPostTrainingQuantization`, which

1. builds the activation histograms of the 'KL' and 'hist' algorithms from 0 instead of from the
   smallest observed |x| (upstream's thresholds were wrong whenever that minimum was not ~0), and
2. replaces the pure-Python KL threshold search (seconds per tensor, minutes to hours per model)
   by `thresholds.kl_threshold`, a numpy version that chooses the same threshold.

It also returns what the run decided (`PTQResult`): thresholds, quantized tensors and ops, so a
later step can put the same scales into an ONNX graph.

Paddle facts this module relies on (paddle 2.6.2): the calibration data must come from a
`paddle.io.DataLoader`; a loader's own batch size is the one used (`PTQSettings.batch_size` is
only checked to be positive); `batch_nums` counts loader batches; the 'KL' and 'hist' algorithms
iterate the loader twice (abs-max pass, then histogram pass), so it must give the same batches in
the same order each time (no shuffling).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
from paddle.static.quantization import PostTrainingQuantization
from paddle.static.quantization.quant_config import SUPPORT_QUANTIZATION_OP_DICT

from .errors import ConfigError, ModelError
from .paddle_output import canonicalize_program_file, fresh_names, quiet_ptq
from .paddle_params import add_to_param, block_conv_bias_params, static_mode
from .paddle_speedups import faster_ir_graph
from .thresholds import kl_threshold, ptf_threshold, search_candidates, search_losses

log = logging.getLogger("yoloquant")

# The algorithms PostTrainingQuantization accepts (its `_support_algo_type`), minus 'min_max':
# with 'min_max' paddle 2.6 only writes min/max attributes on the ops and inserts no
# quantize/dequantize ops at all, so the "quantized" model is the float model.
SUPPORTED_ALGOS = ("KL", "hist", "avg", "mse", "emd", "abs_max", "ptf")
WEIGHT_QUANTIZE_TYPES = ("abs_max", "channel_wise_abs_max")
ACTIVATION_QUANTIZE_TYPES = ("range_abs_max", "moving_average_abs_max", "abs_max")
ROUND_TYPES = ("round", "adaround")
DEPLOY_BACKENDS = (None, "tensorrt", "mkldnn", "arm")
# quant_post_static's default op list
DEFAULT_QUANTIZABLE_OPS = ("conv2d", "depthwise_conv2d", "conv2d_transpose", "mul", "matmul",
                           "matmul_v2")


# --------------------------------------------------------------------------------------------
# The fixed PostTrainingQuantization
# --------------------------------------------------------------------------------------------

class FixedPostTrainingQuantization(PostTrainingQuantization):
    """PostTrainingQuantization with correct and fast 'KL' / 'hist' activation thresholds.

    Upstream bug (paddle 2.6 `post_training_quantization.py`): `_init_sampling_act_histogram`
    spans each |activation| histogram over (abs_min, abs_max), but both threshold rules read a
    bin index as a distance from 0: `cal_kl_threshold` returns `(index + 0.5) * bin_width` and
    `_get_hist_scaling_factor` `(index - 0.5) * bin_width`. The histogram start (abs_min) is
    dropped, so every threshold is at most abs_max - abs_min: for |x| in [0.3, 0.7] the 'hist'
    threshold is ~0.4 and everything above it is clipped.

    Fix, in one place: `_init_sampling_act_histogram` spans the histograms over (0, abs_max).
    Adding abs_min to the thresholds instead would fix 'hist' but not 'KL', whose search maps
    bins [0, i) onto the 127 int8 levels and so assumes bin 0 starts at 0. Bins get slightly
    wider when abs_min > 0; for the usual abs_min ~ 0 nothing changes.

    Speed: `_calculate_kl_hist_threshold` computes activation thresholds with `kl_threshold`
    (numpy) instead of upstream's pure-Python `cal_kl_threshold`. Weight thresholds are still
    computed by the upstream method, unchanged.

    Third upstream bug (float64 activations): AddQuantDequantPassV2 puts a Q/DQ pair on float64
    inputs of the observed ops too (concat, elementwise_mul, ...), and its scale variable takes
    the input's dtype. Paddle Inference then fails to load the saved model ("The type of data
    we are trying to retrieve (float32) does not match the type of data (float64)"): seen on the
    YOLOv6-Lite anchor grid, computed in float64. `_collect_target_varnames` here leaves the ops
    reading non-float32 activations unquantized (no int8 kernel reads them anyway).

    Second upstream bug ('ptf'): `_sample_ptf` overwrites each activation threshold on every
    batch, so the model is calibrated on the last batch alone. `_sample_ptf` here applies
    upstream's per-batch rule (`ptf_threshold`) and keeps the mean over the batches, as 'avg'
    does with the batch abs-max.
    """

    def _collect_target_varnames(self):
        super()._collect_target_varnames()
        fp32 = paddle.base.core.VarDesc.VarType.FP32
        lod_tensor = paddle.base.core.VarDesc.VarType.LOD_TENSOR
        others = set()
        for block in self._program.blocks:
            for op in block.ops:
                inputs = [block._var_recursive(n) for n in op.input_arg_names]
                odd = {v.name for v in inputs if not v.persistable and v.type == lod_tensor
                       and v.dtype != fp32} & self._quantized_act_var_name
                if odd:
                    op._set_attr("op_namescope", "skip_quant")  # no Q/DQ on its inputs
                    others |= odd
        for block in self._program.blocks:  # outputs of the observed ops too
            others |= {v.name for v in block.vars.values() if v.name in self._quantized_act_var_name
                       and v.type == lod_tensor and v.dtype != fp32}
        # still observed (upstream asserts every observed op output has a threshold), but left
        # out of the scales written into the program (see _update_program)
        self._non_fp32_activations = others
        if others:
            log.info("%d non-float32 activations (e.g. %s) get no Q/DQ: Paddle Inference cannot "
                     "load float64 scales", len(others), sorted(others)[0])

    def _init_sampling_act_histogram(self):
        for var_name in self._searched():
            if var_name in self._sampling_act_histogram:
                continue
            if var_name not in self._sampling_act_abs_min_max:
                continue  # zero-size in every batch: upstream skips it too
            abs_max = float(self._sampling_act_abs_min_max[var_name][1])
            # all-zero tensor: any positive range puts every value in bin 0
            upper = abs_max if abs_max > 0 else 1.0
            hist, edges = np.histogram([], bins=self._histogram_bins, range=(0.0, upper))
            self._sampling_act_histogram[var_name] = [hist, edges]

    @contextmanager
    def _weights_only(self):
        """Hide the activations from an upstream method that handles weights and activations
        together, so that only its weight part runs."""
        activations = self._quantized_act_var_name
        self._quantized_act_var_name = set()
        try:
            yield
        finally:
            self._quantized_act_var_name = activations

    def _searched(self) -> set:
        """The observed activations whose threshold an int8 kernel reads: the inputs of the
        quantized ops.

        Paddle also observes the outputs of the quantized ops and of ~20 other op types
        (elementwise_add, sigmoid, concat, pool, ...: 326 of the 376 observed tensors on
        yolov5n) and gives them Q/DQ pairs that neither deployed runtime reads with our op set:
        oneDNN int8 does not requantize conv outputs, and the QDQ ONNX takes only conv input
        thresholds from here. Tripling all 325 of those scales left every output value of the
        Paddle oneDNN int8 run of yolov5n unchanged, while changing a conv input scale changes
        it (tests/test_ptq.py checks both on a small converted model). So those keep their
        abs-max and only these are searched (KL, hist, mse, emd)."""
        if "_searched_names" in self.__dict__:
            return self._searched_names
        if not self._onnx_format:
            # the legacy program stores output scales as op attributes, which Paddle's int8
            # passes may read: that was not measured, so everything is searched as upstream does
            self._searched_names = set(self._quantized_act_var_name)
        else:
            kinds = set(self.quant_config.weight_quant_operation_types) \
                | set(self.quant_config.activation_quant_operation_types)
            names = {name for op in self._program.global_block().ops if op.type in kinds
                     for name in op.input_arg_names}
            self._searched_names = names & set(self._quantized_act_var_name)
            log.info("threshold search on the %d of %d observed activations an int8 kernel "
                     "reads (quantized op inputs); the others keep their abs-max",
                     len(self._searched_names), len(self._quantized_act_var_name))
        return self._searched_names

    def _observed(self, names=None) -> list:
        """(name, value) of every non-empty observed activation of this batch (only those in
        `names` if given); empty ones are recorded in _zero_size_var_names, as upstream does."""
        out = []
        for var_name in self._quantized_act_var_name:
            if names is not None and var_name not in names:
                continue
            # np.asarray: one copy out of the scope (upstream's np.array makes two)
            tensor = np.asarray(self._scope.find_var(var_name).get_tensor())
            if tensor.size == 0:
                self._zero_size_var_names.add(var_name)
                continue
            out.append((var_name, tensor))
        return out

    def _sample_histogram(self):
        # Upstream passes the edges array to np.histogram, which sorts every block of values:
        # with ~390 observed tensors per batch that was half of a KL run on yolov5n (29 of 57 s).
        # Our edges are uniform from 0 (see above), so a value's bin is floor(|x| / width):
        # one multiply and a bincount, spread over two threads (numpy releases the GIL in the
        # elementwise part). Only values within float32 rounding of an edge can land one bin
        # over (tested).
        todo = []
        for var_name, tensor in self._observed(self._searched()):
            if var_name not in self._sampling_act_histogram:
                self._zero_size_var_names.add(var_name)
                continue
            todo.append((var_name, tensor))

        def count(item):
            var_name, tensor = item
            hist, edges = self._sampling_act_histogram[var_name]
            bins = len(edges) - 1
            index = np.abs(tensor.reshape(-1))
            np.multiply(index, np.float32(bins / edges[-1]), out=index)
            # the abs-max itself lands at index `bins`: the last bin is closed, as in np.histogram
            counts = np.bincount(index.astype(np.int32), minlength=bins + 1)
            counts[bins - 1] += counts[bins:].sum()
            return hist, counts[:bins]

        with ThreadPoolExecutor(max_workers=2) as pool:
            for hist, counts in pool.map(count, todo):
                hist += counts

    # Optional callback(thresholds, ops) -> LayerDecisions, set by run_ptq: called once every
    # threshold is known and before quantize ops are inserted (see LayerDecisions).
    before_update = None
    bias_corrected: Tuple[str, ...] = ()  # weight names whose conv bias was shifted

    def _update_program(self):
        if self.before_update is not None:
            self._apply_layer_decisions()
        odd = getattr(self, "_non_fp32_activations", set())
        if odd and self._scale_dict is None and self._same_scale_tensor_list is None:
            # the scales upstream would write, minus the non-float32 tensors: without a scale
            # AddQuantDequantForInferencePass leaves a tensor unquantized
            thresholds = self._quantized_var_threshold if self._algo in ("KL", "hist") \
                else self._quantized_threshold
            self._scale_dict = {k: v for k, v in thresholds.items() if k not in odd}
        # The observer Q/DQ Paddle leaves on a float conv's input still gives its producers an
        # int8 output scale in oneDNN; removing those pairs was tried and changed nothing
        # (YOLOX-nano avg: 0.2880 either way), so they stay.
        with faster_ir_graph():  # the same rewrite without whole-graph scans per edit
            super()._update_program()

    def _apply_layer_decisions(self):
        thresholds = self._quantized_var_threshold if self._algo in ("KL", "hist") \
            else self._quantized_threshold
        block = self._program.global_block()
        persistable = {v.name for v in self._program.list_vars() if v.persistable}
        ops = []
        for op in block.ops:
            skipped = op.has_attr("op_namescope") and "skip_quant" in str(op.attr("op_namescope"))
            if op.type in self.quant_config.weight_quant_operation_types and not skipped:
                names = op.input_arg_names
                ops.append(QuantizedOp(op.type, tuple(n for n in names if n not in persistable),
                                       tuple(n for n in names if n in persistable),
                                       tuple(op.output_arg_names)))
        decisions = self.before_update({k: _plain(v) for k, v in thresholds.items()}, tuple(ops))
        if not isinstance(decisions, LayerDecisions):
            raise TypeError(f"before_update must return LayerDecisions, got {type(decisions).__name__}")
        skip = set(decisions.float_weights)
        for op in block.ops:
            if skip & set(op.input_arg_names):
                op._set_attr("op_namescope", "skip_quant")  # what skip_tensor_list sets
        wanted = sorted(w for w in decisions.bias_shifts if w not in skip)
        biases = block_conv_bias_params(block, wanted, persistable)
        for weight in wanted:
            if weight not in biases:
                log.warning("no bias parameter found after the conv reading %s: its bias is not "
                            "corrected", weight)
                continue
            add_to_param(self._scope, biases[weight], decisions.bias_shifts[weight], self._place)
        self.bias_corrected = tuple(w for w in wanted if w in biases)

    def _keep_abs_max(self, var_name: str, abs_max: float) -> None:
        """Threshold of a tensor read by no int8 kernel (not searched): its abs-max over the
        batches so far."""
        self._quantized_threshold[var_name] = max(abs_max, self._quantized_threshold.get(var_name, 0.0))

    def _sample_ptf(self):
        """One batch of 'ptf' (see the class docstring): the running mean of the per-batch
        thresholds; tensors read by no int8 kernel get the abs-max over the batches."""
        if self._quantized_threshold == {}:
            with self._weights_only():  # weight thresholds: upstream's own code, run once
                super()._sample_ptf()
        searched = self._searched()
        sums = self.__dict__.setdefault("_ptf_sums", {})

        def threshold_of(item):
            var_name, tensor = item
            if var_name not in searched:
                return var_name, None, float(max(tensor.max(), -tensor.min()))
            return var_name, ptf_threshold(tensor, self._activation_bits), None

        with ThreadPoolExecutor(max_workers=2) as pool:
            measured = list(pool.map(threshold_of, self._observed()))
        for var_name, threshold, abs_max in measured:
            if threshold is None:
                self._keep_abs_max(var_name, abs_max)
                continue
            total, batches = sums.get(var_name, (0.0, 0))
            sums[var_name] = (total + threshold, batches + 1)
            self._quantized_threshold[var_name] = (total + threshold) / (batches + 1)

    def _sample_mse(self):
        self._search_threshold("mse")

    def _sample_emd(self):
        self._search_threshold("emd")

    def _search_threshold(self, loss: str):
        """Upstream's mse / emd sampling step for one batch, with `search_losses`: each tensor
        keeps the candidate scale with the lowest loss seen in any batch so far (ties: the later
        one), as upstream does."""
        if self._quantized_threshold == {}:
            with self._weights_only():  # weight thresholds: upstream's own code, run once
                super()._sample_mse()

        searched = self._searched()

        def losses_of(item):
            var_name, tensor = item
            abs_max = float(max(tensor.max(), -tensor.min()))
            abs_max = 1e-8 if abs_max == 0.0 else abs_max
            if var_name not in searched:
                return var_name, abs_max, None
            return var_name, abs_max, search_losses(tensor, abs_max, loss, self._activation_bits,
                                                    self._onnx_format)

        with ThreadPoolExecutor(max_workers=2) as pool:
            measured = list(pool.map(losses_of, self._observed()))
        fractions = search_candidates()
        for var_name, abs_max, losses in measured:
            if losses is None:
                self._keep_abs_max(var_name, abs_max)
                continue
            best = self._best_calibration_loss.setdefault(var_name, float("inf"))
            for fraction, value in zip(fractions, losses):
                if value <= best:
                    best = value
                    self._quantized_threshold[var_name] = fraction * abs_max
            self._best_calibration_loss[var_name] = best

    def _calculate_kl_hist_threshold(self):
        # Upstream does weights and activations in one method. Run it with no activations so
        # the weight thresholds come from upstream's own code, then do the activations here.
        with self._weights_only():
            super()._calculate_kl_hist_threshold()

        searched = self._searched()
        for var_name in sorted(self._quantized_act_var_name):
            if var_name not in searched and var_name in self._sampling_act_abs_min_max:
                self._quantized_var_threshold[var_name] = \
                    float(self._sampling_act_abs_min_max[var_name][1])
                continue
            if var_name not in self._sampling_act_histogram:
                continue  # zero-size tensor: upstream leaves it without threshold as well
            hist, edges = self._sampling_act_histogram[var_name]
            if edges[0] != 0:
                raise AssertionError(f"histogram of {var_name} does not start at 0")
            if self._algo == "KL":
                threshold = kl_threshold(hist, edges[1] - edges[0], self._activation_bits)
            else:
                # upstream's rule is right once the histogram starts at 0
                threshold = float(self._get_hist_scaling_factor(hist, edges))
            self._quantized_var_threshold[var_name] = threshold


@dataclass(frozen=True)
class LayerDecisions:
    """What a `before_update` callback decides once the thresholds are known.

    float_weights: weight names whose ops stay float, as if they had been in skip_tensor_list
        from the start.
    bias_shifts: weight name -> per-output-channel value added to the bias of the conv reading
        that weight (bias correction); convs whose bias cannot be found are logged and left.
    """

    float_weights: Tuple[str, ...] = ()
    bias_shifts: Dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Settings, result and the entry point
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PTQSettings:
    """The arguments of `quant_post_static` that shape the calibration, with its defaults.

    `batch_size` is kept for compatibility but has no effect: the DataLoader's own batch size is
    used. `batch_nums` counts loader batches (None: the whole loader). Lists are stored as tuples.
    """

    algo: str = "hist"
    hist_percent: float = 0.9999
    batch_nums: Optional[int] = None
    batch_size: int = 1
    quantizable_op_type: Tuple[str, ...] = DEFAULT_QUANTIZABLE_OPS
    weight_quantize_type: str = "channel_wise_abs_max"
    activation_quantize_type: str = "range_abs_max"
    is_full_quantize: bool = False
    onnx_format: bool = True
    bias_correction: bool = False
    skip_tensor_list: Optional[Tuple[str, ...]] = None
    weight_bits: int = 8
    activation_bits: int = 8
    round_type: str = "round"
    optimize_model: bool = False
    deploy_backend: Optional[str] = None

    def __post_init__(self):
        # frozen: normalise list arguments through object.__setattr__
        object.__setattr__(self, "quantizable_op_type", tuple(self.quantizable_op_type))
        if self.skip_tensor_list is not None:
            object.__setattr__(self, "skip_tensor_list", tuple(self.skip_tensor_list))
        self._validate()

    def _validate(self):
        # upstream checks these with asserts (or not at all): turn them into readable errors
        if self.algo == "min_max":
            raise ConfigError("algo 'min_max' is not supported: paddle's PTQ inserts no "
                              "quantize ops with it. Valid: " + ", ".join(SUPPORTED_ALGOS))
        if self.algo not in SUPPORTED_ALGOS:
            raise ConfigError(f"unknown PTQ algo {self.algo!r}; valid: "
                              + ", ".join(SUPPORTED_ALGOS))
        if not 0.0 < self.hist_percent < 1.0:
            # at 1.0 float round-off can leave upstream's cumulative sum below the target and
            # the threshold negative; algo 'abs_max' is the way to keep the full range
            raise ConfigError(f"hist_percent must be in (0, 1), got {self.hist_percent}")
        if self.batch_nums is not None and self.batch_nums < 1:
            raise ConfigError(f"batch_nums must be >= 1 or null, got {self.batch_nums}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_quantize_type not in WEIGHT_QUANTIZE_TYPES:
            raise ConfigError(f"weight_quantize_type {self.weight_quantize_type!r}; valid: "
                              + ", ".join(WEIGHT_QUANTIZE_TYPES))
        if self.activation_quantize_type not in ACTIVATION_QUANTIZE_TYPES:
            raise ConfigError(f"activation_quantize_type {self.activation_quantize_type!r}; "
                              "valid: " + ", ".join(ACTIVATION_QUANTIZE_TYPES))
        if self.round_type not in ROUND_TYPES:
            raise ConfigError(f"round_type {self.round_type!r}; valid: " + ", ".join(ROUND_TYPES))
        if self.round_type == "adaround" and self.onnx_format:
            # paddle 2.6 writes AdaRound's int8 values as the weights, then the onnx_format
            # program quantizes them again (tested: output off by more than its own range)
            raise ConfigError("round_type 'adaround' with onnx_format is broken in paddle 2.6 (the "
                              "weights are quantized twice; yolov5n scores mAP 0.000). Use "
                              "fine_tune.py for learned rounding (AdaRound / BRECQ / QDrop)")
        if self.weight_bits != self.activation_bits or not 2 <= self.weight_bits <= 16:
            raise ConfigError("weight_bits and activation_bits must be equal (paddle supports "
                              f"nothing else) and in 2..16, got {self.weight_bits} and "
                              f"{self.activation_bits}")
        if not self.is_full_quantize:
            bad = [t for t in self.quantizable_op_type if t not in SUPPORT_QUANTIZATION_OP_DICT]
            if bad:
                raise ConfigError(f"op types {bad} cannot be quantized; valid: "
                                  + ", ".join(sorted(SUPPORT_QUANTIZATION_OP_DICT)))
        backend = self.deploy_backend.lower() if self.deploy_backend else None
        if backend not in DEPLOY_BACKENDS:
            # upstream silently falls back to no quantizer config for an unknown backend
            raise ConfigError(f"deploy_backend {self.deploy_backend!r}; valid: None, TensorRT, "
                              "MKLDNN, ARM")


@dataclass(frozen=True)
class QuantizedOp:
    """One op of the saved program that reads quantized tensors.

    Names are the FP32 program's: `inputs` are activations that got a quantize/dequantize pair,
    `weights` the quantized weights, `outputs` the op's outputs (unchanged by quantization).
    """

    op_type: str
    inputs: Tuple[str, ...]
    weights: Tuple[str, ...]
    outputs: Tuple[str, ...]


@dataclass(frozen=True)
class PTQResult:
    """What a calibration run produced.

    thresholds: var name -> clip threshold (the abs-max range, not the int8 scale: the scale
        is threshold / (2**(bits-1) - 1)); a list of per-channel values for channel-wise
        weights. Covers weights, quantized inputs and the outputs of quantized and "observer"
        ops (paddle records ranges for many op outputs it does not quantize).
    weight_names / activation_names: the tensors paddle calibrated (sorted).
    quantized_ops: the ops that read quantized tensors, in program order.
    """

    model_path: str
    params_path: str
    algo: str
    thresholds: Dict[str, Union[float, List[float]]]
    weight_names: Tuple[str, ...]
    activation_names: Tuple[str, ...]
    quantized_ops: Tuple[QuantizedOp, ...] = field(default_factory=tuple)
    bias_corrected: Tuple[str, ...] = ()  # weights whose conv bias before_update shifted


def calibration_loader(images: Sequence[np.ndarray], feed_name: str,
                       batch_size: int = 1) -> "paddle.io.DataLoader":
    """A DataLoader feeding `images` (indexable, each one CHW array) as {feed_name: batch}.

    Not shuffled: 'KL' and 'hist' read the loader twice and need the same batches both times.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

    class _Feed(paddle.io.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {feed_name: np.asarray(images[i], dtype=np.float32)}

    return paddle.io.DataLoader(_Feed(), batch_size=batch_size, shuffle=False, drop_last=False,
                                return_list=True)


def _resolve_model_files(model_dir: str, model_filename: Optional[str],
                         params_filename: Optional[str]) -> None:
    """Raise ModelError unless the files paddle's load_inference_model will look for exist."""
    if not os.path.isdir(model_dir):
        raise ModelError(f"model directory not found: {model_dir}")

    def exists(name: str, suffix: str) -> bool:
        # load_inference_model tries '<name><suffix>' first, then '<name>'
        return any(os.path.isfile(os.path.join(model_dir, n)) for n in (name + suffix, name))

    model_name = model_filename if model_filename is not None else "__model__"
    if not exists(model_name, ".pdmodel"):
        raise ModelError(f"no model file {model_name!r} in {model_dir}")
    if params_filename is not None and not exists(params_filename, ".pdiparams"):
        raise ModelError(f"no params file {params_filename!r} in {model_dir}")


def _plain(value):
    """Thresholds as plain floats (upstream mixes numpy scalars, floats and lists)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [float(v) for v in np.ravel(value)]
    return float(value)


def _quantized_ops(program, weight_names) -> Tuple[QuantizedOp, ...]:
    """Find the ops reading quantized tensors in a quantized program.

    onnx_format programs: an input is quantized when it comes from a dequantize_linear that is
    not `only_observer`; that op reads either a weight (persistable, stored as int8) or the
    output of a quantize_linear whose input is the FP32 activation. Legacy programs: activations
    come from fake_quantize* ops, weights are read directly (already rounded in place).
    Var names are not unique (paddle can write one name twice), so producers are tracked in
    program order.
    """
    producer = {}

    def trace(name):
        """(fp32 name, is_weight) for a quantized input, None for anything else."""
        op = producer.get(name)
        if op is None:
            return None
        if op.type == "dequantize_linear":
            if op.has_attr("only_observer") and op.attr("only_observer"):
                return None
            x = op.input("X")[0]
            q = producer.get(x)
            if q is not None and q.type == "quantize_linear":
                return q.input("X")[0], False
            return x, True
        if op.type.startswith(("fake_quantize", "fake_channel_wise_quantize")):
            return op.input("X")[0], False
        return None

    found = []
    for op in program.global_block().ops:
        is_quant_op = op.type in ("quantize_linear", "dequantize_linear") or \
            op.type.startswith("fake_")
        if not is_quant_op and op.type not in ("feed", "fetch"):
            inputs, weights = [], []
            for name in op.input_arg_names:
                traced = trace(name)
                if traced is not None:
                    (weights if traced[1] else inputs).append(traced[0])
                elif name in weight_names:
                    weights.append(name)  # legacy format: frozen weight read directly
            if inputs or weights:
                found.append(QuantizedOp(op.type, tuple(inputs), tuple(weights),
                                         tuple(op.output_arg_names)))
        for name in op.output_arg_names:
            producer[name] = op
    return tuple(found)


def run_ptq(settings: PTQSettings, data_loader, model_dir: Union[str, os.PathLike],
            model_filename: Optional[str], params_filename: Optional[str],
            save_dir: Union[str, os.PathLike], executor=None, scope=None,
            save_model_filename: str = "model.pdmodel", before_update=None) -> PTQResult:
    """Calibrate and quantize a Paddle inference model as quant_post_static would, fixed.

    data_loader: a `paddle.io.DataLoader` yielding feed dicts (see `calibration_loader`); its
        batch size is the one used and `settings.batch_nums` counts its batches.
    model_dir, model_filename, params_filename: the FP32 model, as for load_inference_model.
    save_dir: where `<save_model_filename>` and the matching `.pdiparams` are written (paddle
        names the params after the model file; quant_post_static's params name is ignored).
    executor, scope: default a CPU executor and a fresh Scope, so runs do not share state.
    before_update: optional `f(thresholds, ops) -> LayerDecisions` called with the calibrated
        thresholds (as in PTQResult) and the weight ops about to be quantized (QuantizedOp);
        the ops reading its float_weights stay float, its bias_shifts are applied.
    Runs in static mode and switches back to dynamic mode afterwards if that was the mode.
    """
    if not isinstance(data_loader, paddle.io.DataLoader):
        raise ConfigError("data_loader must be a paddle.io.DataLoader (paddle 2.6 refuses "
                          f"generators), got {type(data_loader).__name__}; see "
                          "yoloquant.calibration.calibration_loader")
    model_dir = os.fspath(model_dir).rstrip("/")
    save_dir = os.fspath(save_dir)
    _resolve_model_files(model_dir, model_filename, params_filename)
    if settings.algo in ("KL", "hist") and getattr(data_loader.batch_sampler, "shuffle", False):
        log.warning("the calibration loader shuffles: 'KL'/'hist' read it twice and values "
                    "beyond the first pass's range are dropped from the histograms")
    loader_batch = getattr(data_loader, "batch_size", None)
    if loader_batch is not None and loader_batch != settings.batch_size:
        log.info("calibration uses the loader's batch size %s (batch_size %s is ignored)",
                 loader_batch, settings.batch_size)

    with static_mode():
        if executor is None:
            executor = paddle.static.Executor(paddle.CPUPlace())
        scope = scope if scope is not None else paddle.static.Scope()
        # load_inference_model and save_inference_model use the global scope: point it at ours
        with paddle.static.scope_guard(scope):
            ptq = FixedPostTrainingQuantization(
                executor=executor,
                data_loader=data_loader,
                model_dir=model_dir,
                model_filename=model_filename,
                params_filename=params_filename,
                batch_size=settings.batch_size,
                batch_nums=settings.batch_nums,
                scope=scope,
                algo=settings.algo,
                round_type=settings.round_type,
                hist_percent=settings.hist_percent,
                bias_correction=settings.bias_correction,
                quantizable_op_type=list(settings.quantizable_op_type),
                is_full_quantize=settings.is_full_quantize,
                weight_bits=settings.weight_bits,
                activation_bits=settings.activation_bits,
                activation_quantize_type=settings.activation_quantize_type,
                weight_quantize_type=settings.weight_quantize_type,
                onnx_format=settings.onnx_format,
                skip_tensor_list=(list(settings.skip_tensor_list)
                                  if settings.skip_tensor_list is not None else None),
                optimize_model=settings.optimize_model,
                deploy_backend=settings.deploy_backend,
            )
            ptq.before_update = before_update
            with quiet_ptq():
                ptq.quantize()
                with fresh_names():
                    ptq.save_quantized_model(save_dir, model_filename=save_model_filename)
        # same naming rule as save_quantized_model
        stem = save_model_filename[:-len(".pdmodel")] \
            if save_model_filename.endswith(".pdmodel") else save_model_filename
        model_path = os.path.join(save_dir, stem + ".pdmodel")
        params_path = os.path.join(save_dir, stem + ".pdiparams")
        canonicalize_program_file(model_path)  # identical runs, identical bytes
        # read the ops back from disk: the in-memory program still holds ops the save pruned
        with open(model_path, "rb") as f:
            saved = paddle.static.Program.parse_from_string(f.read())
        weights = tuple(sorted(ptq._quantized_weight_var_name))
        quantized_ops = _quantized_ops(saved, set(weights))

    scale_dict = ptq._scale_dict or {}
    return PTQResult(
        model_path=model_path,
        params_path=params_path,
        algo=settings.algo,
        thresholds={name: _plain(v) for name, v in sorted(scale_dict.items())},
        weight_names=weights,
        activation_names=tuple(sorted(ptq._quantized_act_var_name)),
        quantized_ops=quantized_ops,
        bias_corrected=ptq.bias_corrected,
    )
