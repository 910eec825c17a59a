"""Exit-8 specialist data: exit-30 teacher scores of the shipping stack on train groups (+ corpus
pseudo-queries: a document's title as the query, its abstract the positive, BM25 negatives over
abstracts), and the stack merged and truncated to 8 layers as a base model."""
import gzip, json, random, sys, time
from pathlib import Path
sys.path.insert(0, "src")
import torch
from matryoshka_reranker.config import load_params
from matryoshka_reranker.core.bm25 import BM25Index
from matryoshka_reranker.model.adapters import merge_adapters
from matryoshka_reranker.model.modeling import MatryoshkaModel
from matryoshka_reranker.serving.reranker import MatryoshkaReranker
from matryoshka_reranker.training.trainer import load_base

params = load_params(sys.argv[1])  # the stack: self_distill + 400-step layer adapter
TAG = sys.argv[2] if len(sys.argv) > 2 else ""  # output suffix
NEG = 7
PSEUDO = int(sys.argv[3]) if len(sys.argv) > 3 else 800  # corpus pseudo-queries (0: none)
t0 = time.time()
train = []
for line in open("derived/train_scored.jsonl"):
    r = json.loads(line)
    train.append({"query_id": r["query_id"], "query": r["query"], "pos": r["pos"][:1], "neg": r["neg"][:NEG]})
corpus = [json.loads(l) for l in gzip.open("data/scifact/corpus.jsonl.gz", "rt")]
test_docs = {l.split("\t")[1] for l in open("data/scifact/qrels/test.tsv").read().splitlines()[1:]}
abstracts = {d["_id"]: d["text"] for d in corpus if len(d["text"]) >= 200}
pool = [d for d in corpus if d["_id"] in abstracts and d["_id"] not in test_docs and len(d["title"]) >= 40]
random.Random(42).shuffle(pool)
index = BM25Index(abstracts)
pseudo = []
sources = pool[:PSEUDO]
hits = index.search([d["title"] for d in sources], NEG + 1) if sources else []
for d, row in zip(sources, hits):
    negs = [abstracts[i] for i, _ in row if i != d["_id"]][:NEG]
    pseudo.append({"query_id": f"t{d['_id']}", "query": d["title"], "pos": [d["text"]], "neg": negs})
print(f"{len(train)} train, {len(pseudo)} pseudo, {len(test_docs)} test docs excluded ({time.time()-t0:.0f}s)", flush=True)

reranker = MatryoshkaReranker.from_pipeline(params, ratio=1, batch_size=32)
print("scoring dtype", next(reranker.model.decoder.parameters()).dtype, flush=True)
for name, rows in (("train", train), ("pseudo", pseudo)):
    if not rows:
        continue
    pairs = [(r["query"], p) for r in rows for p in r["pos"] + r["neg"]]
    t = time.time()
    scores = reranker.compute_score(pairs, cutoff_layers=[30])
    print(f"{name}: {len(pairs)} pairs in {time.time()-t:.0f}s", flush=True)
    it = iter(scores)
    with open(f"derived/e8{TAG}_{name}.jsonl", "w") as out:
        for r in rows:
            r["pos_scores"] = [next(it) for _ in r["pos"]]
            r["neg_scores"] = [next(it) for _ in r["neg"]]
            out.write(json.dumps(r) + "\n")
del reranker

# The same stack merged in fp32, cut after layer 8: exits 4..8 keep their trained heads.
model, tokenizer, _ = load_base(params.model_copy(update={"model": params.model.model_copy(update={"dtype": "float32"})}))
model = merge_adapters(model, params.adapter_stack(1)).eval()
decoder = model.decoder
decoder.layers = decoder.layers[:8]
decoder.config.num_hidden_layers = 8
if getattr(decoder.config, "layer_types", None):
    decoder.config.layer_types = decoder.config.layer_types[:8]
cut = MatryoshkaModel(decoder, model.start_layer, model.layer_sep)
cut.score_heads.load_state_dict({k: v for k, v in model.score_heads.state_dict().items()
                                 if int(k.split(".")[0]) <= 8})
cut.save_pretrained(f"models/trunc8{TAG}", tokenizer=tokenizer)
print(f"saved models/trunc8{TAG}", cut.exit_layers, f"{time.time()-t0:.0f}s")
