"""Write the 300-query params for seed 3 (as seed 7's params300_seed7*.yaml, from this workspace's params.yaml)."""
import copy
import yaml
from matryoshka_reranker.config import load_params

base = yaml.safe_load(open("params.yaml"))
assert base["self_distill"]["seed"] == 3 and base["self_distill"]["max_steps"] == 1200
p = copy.deepcopy(base)
p["data"]["eval_queries"] = 0
p["paths"]["eval_candidates"] = "derived300/eval_candidates.jsonl"
p["paths"]["train_groups"] = "derived300/train_groups.jsonl"
p["paths"]["checkpoints"] = "checkpoints_w8_400"
p["paths"]["compensation"] = "models/compensation_w8_400"
p["compensation"]["layer"].update(max_steps=400, save_steps=100, seed=3, layer_weights={8: 8.0}, bf16_autocast=True)
p["compensation"]["token"].update(bf16_autocast=True, seed=3)
mse = copy.deepcopy(p)
mse["compensation"]["token"].update(max_steps=600, save_steps=200, snapshot_steps=[200, 400], train_method="same_layer_mse")
mse["paths"]["checkpoints"] = "checkpoints_mse"
mse["paths"]["compensation"] = "models/comp_mse"
for name, d in [("params300_seed3", p), ("params300_seed3_mse", mse)]:
    for suffix, dtype in [("", base["model"]["dtype"]), ("_bf16", "bfloat16")]:
        q = copy.deepcopy(d)
        q["model"]["dtype"] = dtype
        yaml.safe_dump(q, open(f"{name}{suffix}.yaml", "w"), sort_keys=False)
        load_params(f"{name}{suffix}.yaml")
        print("wrote", f"{name}{suffix}.yaml")
