"""Spearman vs fp32 and nDCG@10 of the default int8-token copies on every held-out eval query (no timing)."""
import sys, tempfile, numpy as np
from pathlib import Path
sys.path.insert(0, "/work/main/src")
from scipy.stats import spearmanr
from matryoshka_reranker.config import load_params
from matryoshka_reranker.pipeline.calibration import calibration_set, in_calibration_half
from matryoshka_reranker.pipeline.evaluation import load_eval_set, per_query
from matryoshka_reranker.pipeline.quantize import quantize_model
from matryoshka_reranker.serving.artifacts import exit_model_file, ratio_folder
from matryoshka_reranker.serving.onnx_runtime import OnnxReranker, create_session

params = load_params("/work/exp800/params.yaml")
queries, qrels = load_eval_set(params)
held_ids = None
cal = calibration_set(queries, dict(qrels), params.export.calibration_queries)
held = [q for q in queries if not in_calibration_half(q.query_id)]
qrels = {q.query_id: qrels[q.query_id] for q in held}  # per_query scores every qrels query (0 when absent from the run)
pairs = [p for q in held for p in q.pairs]
print(f"# {len(held)} held-out queries x 20 ({len(pairs)} pairs); calibration {len(cal.query_ids)} queries; int8-token defaults, alpha {params.export.quantize_smoothing}", flush=True)
folder = Path(params.paths.onnx) / ratio_folder(1)
def by_query(v):
    out, o = {}, 0
    for q in held:
        out[q.query_id] = list(v[o:o + len(q.candidates)]); o += len(q.candidates)
    return out
for k in [int(a) for a in sys.argv[1:]]:
    fp32 = OnnxReranker(folder, k, threads=2, batch_size=20)
    enc_cal = fp32.encoder.encode_many(list(cal.pairs))
    feeds = [fp32.encoder.collate_numpy(enc_cal[i:i + 16]) for i in range(0, len(enc_cal), 16)]
    with tempfile.TemporaryDirectory(dir=folder.parent.parent) as work:
        target = Path(work) / "model.onnx"
        info = quantize_model(folder / exit_model_file(k), target, "int8-token", None, calibration=feeds,
                              smoothing=params.export.quantize_smoothing)
        q = OnnxReranker.__new__(OnnxReranker)
        session = create_session(target, ["CPUExecutionProvider"], 2)
        names = [i.name for i in session.get_inputs()]
        encoded = fp32.encoder.encode_many(pairs)
        def run(sess):
            out = []
            for j in range(0, len(encoded), 20):
                b = fp32.encoder.collate_numpy(encoded[j:j + 20])
                out += list(sess.run(["scores"], {n: b[n] for n in names})[0])
            return np.array(out)
        base, quant = run(fp32.session), run(session)
    rho = [spearmanr(a, b).statistic for a, b in zip(by_query(base).values(), by_query(quant).values())]
    nb = per_query(held, by_query(base), qrels, ["nDCG@10"])["nDCG@10"]
    nq = per_query(held, by_query(quant), qrels, ["nDCG@10"])["nDCG@10"]
    diff = np.array([nq[i] - nb[i] for i in nb])
    rng = np.random.default_rng(0)
    boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
    rb = [np.mean(np.array(rho)[rng.integers(0, len(rho), len(rho))]) for _ in range(2000)]
    print(f"exit {k:2d}: Spearman {np.mean(rho):.4f} [{np.percentile(rb, 2.5):.4f}, {np.percentile(rb, 97.5):.4f}] "
          f"(min query {np.min(rho):.3f}); nDCG@10 fp32 {np.mean(list(nb.values())):.4f} -> {np.mean(list(nq.values())):.4f}, "
          f"diff {diff.mean():+.4f} [{np.percentile(boots, 2.5):+.4f}, {np.percentile(boots, 97.5):+.4f}]; kept {info['nodes_kept_fp32']}", flush=True)
