import sys, yaml
base = yaml.safe_load(open("params.yaml"))
def setk(d, key, val):
    *path, last = key.split(".")
    for p in path: d = d.setdefault(p, {})
    d[last] = val
exp = yaml.safe_load(open("configs/experiments/scifact-cpu-rank64-1200-bf16.yaml"))
for k, v in exp.items(): setk(base, k, v)
extra = yaml.safe_load(open(sys.argv[1]))
for k, v in extra.items(): setk(base, k, v)
yaml.safe_dump(base, open(sys.argv[2], "w"), sort_keys=False)
