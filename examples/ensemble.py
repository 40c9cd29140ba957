"""Model ensembling with functorch_lite: evaluate several models of one architecture at once.

ft.stack_module_state stacks the models' weights along a new dim 0; ft.vmap over
ft.functional_call then runs every model in one batched call, either on the same minibatch
(in_dims=(0, 0, None)) or each on its own minibatch (in_dims=(0, 0, 0)). Checked against running
each model in a Python for-loop.

    python examples/ensemble.py [--size small|default]
"""

import argparse
import copy
import time

import torch
import torch.nn as nn

import functorch_lite as ft

SIZES = {
    "small": dict(models=4, batch=16, features=8, hidden=16),
    "default": dict(models=10, batch=64, features=32, hidden=128),
}


def make_model(features, hidden):
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.LayerNorm(hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 3),
    )


def main(size="default"):
    cfg = SIZES[size]
    torch.manual_seed(0)
    models = [make_model(cfg["features"], cfg["hidden"]) for _ in range(cfg["models"])]
    params, buffers = ft.stack_module_state(models)
    # the structure to call: a copy on the meta device (it holds no weights of its own)
    base = copy.deepcopy(models[0]).to("meta")

    def run(params, buffers, x):
        return ft.functional_call(base, (params, buffers), (x,))

    same = torch.randn(cfg["batch"], cfg["features"])  # one minibatch
    different = torch.randn(cfg["models"], cfg["batch"], cfg["features"])  # one per model

    old_mode = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")  # ops without a batching rule run as a for-loop; list them below
    ft._C._reset_fallback_ops_seen()
    try:
        t0 = time.perf_counter()
        out_same = ft.vmap(run, in_dims=(0, 0, None))(params, buffers, same)
        t1 = time.perf_counter()
        out_different = ft.vmap(run, in_dims=(0, 0, 0))(params, buffers, different)
    finally:
        ft.set_vmap_fallback(old_mode)
    fallback_ops = ft._C._fallback_ops_seen()

    with torch.no_grad():
        t2 = time.perf_counter()
        ref_same = torch.stack([m(same) for m in models])
        t3 = time.perf_counter()
        ref_different = torch.stack([m(x) for m, x in zip(models, different)])
    torch.testing.assert_close(out_same, ref_same, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_different, ref_different, atol=1e-5, rtol=1e-4)

    print(f"ensemble of {cfg['models']} models, {sum(p[0].numel() for p in params.values())} parameters each")
    print(
        f"same minibatch:      output {tuple(out_same.shape)}, vmap {1e3 * (t1 - t0):.1f} ms, "
        f"for-loop {1e3 * (t3 - t2):.1f} ms; equal to the for-loop"
    )
    print(f"different minibatch: output {tuple(out_different.shape)}; equal to the for-loop")
    print(f"ops run by vmap's for-loop fallback: {', '.join(fallback_ops) or 'none'}")
    return out_same, out_different


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    main(parser.parse_args().size)
