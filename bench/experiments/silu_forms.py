"""SiLU forms on ONNX Runtime, alone: QLinearSigmoid + QLinearMul, a 256-entry lookup table
(Cast to int32 + Gather: ORT has no uint8 lookup op), and DQ -> float Sigmoid * Mul -> Q, on a
uint8 [1, 32, 160, 160] tensor, 1 thread, no spinning.

  python bench/experiments/silu_forms.py
"""
import time, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
shape=[1,32,160,160]
def sess(nodes, inits, out_type):
    g=helper.make_graph(nodes,"g",[helper.make_tensor_value_info("x",TensorProto.UINT8,shape)],
        [helper.make_tensor_value_info("y",out_type,shape)],initializer=inits)
    m=helper.make_model(g,opset_imports=[helper.make_opsetid("",13),helper.make_opsetid("com.microsoft",1)]); m.ir_version=8
    o=ort.SessionOptions(); o.intra_op_num_threads=1; o.add_session_config_entry("session.intra_op.allow_spinning","0")
    return ort.InferenceSession(m.SerializeToString(),o,providers=["CPUExecutionProvider"])
c=lambda n,v,dt: numpy_helper.from_array(np.array(v,dtype=dt),n)
inits=[c("sx",0.05,np.float32),c("zx",128,np.uint8),c("ss",1/255,np.float32),c("zs",0,np.uint8),c("sy",0.03,np.float32),c("zy",10,np.uint8)]
qlin=sess([helper.make_node("QLinearSigmoid",["x","sx","zx","ss","zs"],["s"],domain="com.microsoft"),
           helper.make_node("QLinearMul",["x","sx","zx","s","ss","zs","sy","zy"],["y"],domain="com.microsoft")],inits,TensorProto.UINT8)
table=np.arange(256,dtype=np.uint8)
lut=sess([helper.make_node("Cast",["x"],["xi"],to=TensorProto.INT32),helper.make_node("Gather",["t","xi"],["y"],axis=0)],[numpy_helper.from_array(table,"t")],TensorProto.UINT8)
# float form: DQ -> Sigmoid, Mul -> Q
fl=sess([helper.make_node("DequantizeLinear",["x","sx","zx"],["xf"]),helper.make_node("Sigmoid",["xf"],["sg"]),helper.make_node("Mul",["xf","sg"],["m"]),helper.make_node("QuantizeLinear",["m","sy","zy"],["y"])],inits,TensorProto.UINT8)
x=np.random.default_rng(0).integers(0,256,shape).astype(np.uint8)
for name,s in [("qlinear",qlin),("lut",lut),("float",fl)]:
    for _ in range(3): s.run(None,{"x":x})
    t=[];c0=time.process_time()
    for _ in range(30): t0=time.perf_counter(); s.run(None,{"x":x}); t.append(time.perf_counter()-t0)
    print(name, f"{np.median(t)*1000:.2f} ms wall, {(time.process_time()-c0)/30*1000:.2f} ms cpu")
