"""yolov5n's image conv (6x6 s2 p2, 3 -> 16 on 640x640) in float, int8 and space-to-depth forms on
ONNX Runtime, 2 threads: process CPU ms and a kernel profile (issue 14: why it stays float).

  python bench/experiments/stem_forms.py
"""
import tempfile
import time, numpy as np, onnx, onnxruntime as ort
from onnx import helper as h, numpy_helper as nh, TensorProto as T
rng = np.random.RandomState(0)
W = rng.randn(16, 3, 6, 6).astype(np.float32) * 0.1; B = rng.randn(16).astype(np.float32)
x = (rng.randint(0, 256, (1, 3, 640, 640)) / 255).astype(np.float32)

def s2d_weight(W):  # 6x6 s2 conv on C -> 3x3 s1 conv on 4C (SpaceToDepth DCR order: (by,bx,c))
    O, C = W.shape[:2]; W2 = np.zeros((O, 4 * C, 3, 3), np.float32)
    for by in range(2):
        for bx in range(2):
            for c in range(C):
                W2[:, (by * 2 + bx) * C + c] = W[:, c, by::2, bx::2]
    return W2

def model(nodes, inits, out_shape=(1, 16, 320, 320)):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 640, 640])],
                     [h.make_tensor_value_info("y", T.FLOAT, list(out_shape))], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])

def qw(W):
    s = np.abs(W).reshape(W.shape[0], -1).max(1) / 127
    return np.round(W / s[:, None, None, None]).astype(np.int8), s.astype(np.float32)

forms = {}
forms["float"] = model([h.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=[6, 6], strides=[2, 2], pads=[2, 2, 2, 2])],
                       [nh.from_array(W, "W"), nh.from_array(B, "B")])
W2 = s2d_weight(W)
# SpaceToDepth via Reshape/Transpose/Reshape: [1,3,320,2,320,2] -> [1,2,2,3,320,320] (by,bx,c)
s2d = [h.make_node("Reshape", ["X0", "sh1"], ["r1"]), h.make_node("Transpose", ["r1"], ["t1"], perm=[0, 3, 5, 1, 2, 4]),
       h.make_node("Reshape", ["t1", "sh2"], ["X1"])]
shp = [nh.from_array(np.array([1, 3, 320, 2, 320, 2], np.int64), "sh1"), nh.from_array(np.array([1, 12, 320, 320], np.int64), "sh2")]
forms["s2d_float"] = model([h.make_node("Identity", ["x"], ["X0"])] + s2d + [
    h.make_node("Conv", ["X1", "W2", "B"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
    [nh.from_array(W2, "W2"), nh.from_array(B, "B")] + shp)
forms["s2d_op_float"] = model([h.make_node("SpaceToDepth", ["x"], ["X1"], blocksize=2),
    h.make_node("Conv", ["X1", "W2", "B"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
    [nh.from_array(W2, "W2"), nh.from_array(B, "B")])
def qdq_forms(Wx, ks, st, pads, pre, name):
    q, s = qw(Wx)
    ys = np.float32(0.05); yz = np.uint8(128)
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"])] + pre + [
        h.make_node("DequantizeLinear", ["XQ", "xs", "xz"], ["xd"]),
        h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        h.make_node("Conv", ["xd", "wd", "B"], ["c"], kernel_shape=ks, strides=st, pads=pads),
        h.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]), h.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    inits = [nh.from_array(np.float32(1 / 255), "xs"), nh.from_array(np.uint8(0), "xz"), nh.from_array(q, "wq"),
             nh.from_array(s, "ws"), nh.from_array(np.zeros(len(s), np.int8), "wz"), nh.from_array(B, "B"),
             nh.from_array(ys, "ys"), nh.from_array(yz, "yz")]
    forms[name] = model(nodes, inits + shp)
qdq_forms(W, [6, 6], [2, 2], [2, 2, 2, 2], [h.make_node("Identity", ["xq"], ["XQ"])], "int8")
s2d_q = [h.make_node("Reshape", ["xq", "sh1"], ["r1"]), h.make_node("Transpose", ["r1"], ["t1"], perm=[0, 3, 5, 1, 2, 4]),
         h.make_node("Reshape", ["t1", "sh2"], ["XQ"])]
qdq_forms(W2, [3, 3], [1, 1], [1, 1, 1, 1], s2d_q, "s2d_int8")
TMP = tempfile.mkdtemp(prefix="stem_")
sessions = {}
for k, m in forms.items():
    o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.add_session_config_entry("session.intra_op.allow_spinning", "0"); o.log_severity_level = 3
    o.optimized_model_filepath = f"{TMP}/stem_{k}_opt.onnx"
    sessions[k] = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
ref = sessions["float"].run(None, {"x": x})[0]
for k, s in sessions.items():
    y = s.run(None, {"x": x})[0]
    print(k, "max abs diff vs float", float(np.abs(y - ref).max()), [n.op_type for n in onnx.load(f"{TMP}/stem_{k}_opt.onnx").graph.node])
times = {k: [] for k in sessions}
for r in range(60):
    for k, s in sessions.items():
        t0 = time.process_time(); s.run(None, {"x": x}); times[k].append(time.process_time() - t0)
for k, v in times.items():
    print(f"{k:14s} cpu ms median {np.median(v[5:]) * 1000:.2f}")
import json
from collections import defaultdict
from pathlib import Path
for k in ("int8", "s2d_int8", "float"):
    o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.add_session_config_entry("session.intra_op.allow_spinning", "0"); o.log_severity_level = 3
    o.enable_profiling = True; o.profile_file_prefix = tempfile.mktemp()
    s = ort.InferenceSession(forms[k].SerializeToString(), o, providers=["CPUExecutionProvider"])
    for _ in range(21): s.run(None, {"x": x})
    per = defaultdict(float)
    for e in json.loads(Path(s.end_profiling()).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"]["op_name"] + ":" + e["name"][:20]] += e["dur"] / 1000 / 21
    print(k, {a: round(b, 2) for a, b in per.items()})
