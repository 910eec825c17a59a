"""scripts/fusion_eval.py with every ratio's adapter stack cut to [self_distill, layer]: ratio r scored with
the layer adapter but without the token adapter (the width drop the token adapter is there to recover)."""
import runpy
import sys

import matryoshka_reranker.config as config

_stack = config.Params.adapter_stack
config.Params.adapter_stack = lambda self, ratio: _stack(self, 1)
sys.argv = ["scripts/fusion_eval.py", *sys.argv[1:]]
runpy.run_path("scripts/fusion_eval.py", run_name="__main__")
