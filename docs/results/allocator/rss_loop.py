import resource, sys, time, torch
sys.path.insert(0, ".")
from benchmarks.common import scifact_pairs
from matryoshka_reranker.serving.reranker import MatryoshkaReranker
torch.set_num_threads(2)
r = MatryoshkaReranker("embedded:smollm2-135m-instruct", batch_size=16, dtype=sys.argv[1])
pairs = scifact_pairs(200)
rss = []
start = time.perf_counter()
for i in range(6):
    for exit_layer, ratio in ((30, 1), (16, 2), (8, 4)):
        r.compute_score(pairs[(i * 17) % 100:][:64 + 16 * i], cutoff_layers=[exit_layer], compress_ratio=ratio,
                        compress_layers=[8] if ratio > 1 else [])
    rss.append(int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20)
print(sys.argv[1], "kept" if __import__("os").environ.get("MATRYOSHKA_CPU_MALLOC") != "0" else "off",
      f"{time.perf_counter() - start:.1f} s", "RSS MB per round", rss, "max", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)
