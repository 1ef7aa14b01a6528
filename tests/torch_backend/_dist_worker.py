"""Worker for test_distributed.py, launched with torch.distributed.run (2 ranks, gloo)."""

import json
import sys

import torch
import torch.distributed as dist

import dualhess
import torch_backend as tb
from torch_backend import is_main_process


def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.double().eval()
    X = torch.randn(150, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (150,))
    return model, X, y


def analyse(op):
    e = dualhess.eigsh(op, k=3, tol=1e-10, seed=0)
    t = dualhess.trace(op, method="xtrace", num_matvecs=40, seed=0)
    d = dualhess.density(op, num_probes=4, num_steps=20, seed=0)
    v = op.matvec(op.asarray(torch.linspace(-1, 1, op.n, dtype=torch.float64).numpy()))
    return {
        "eig": e.values.tolist(),
        "trace": t.value,
        "nodes": d.nodes.tolist(),
        "weights": d.weights.tolist(),
        "hv": v.tolist(),
        "num_samples": op.num_samples,
        "loss": op.loss,
    }


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, X, y = problem()
    # uneven shards: rank 0 holds 100 samples in batches of 64 + 36, rank 1 the last 50
    if rank == 0:
        shard = [(X[:64], y[:64]), (X[64:100], y[64:100])]
    else:
        shard = [(X[100:], y[100:])]
    out = {}
    for reduction in ("mean", "sum"):
        loss = torch.nn.CrossEntropyLoss(reduction=reduction)
        out[reduction] = analyse(tb.hessian(model, loss, shard, method="func"))
    gathered = [None, None]
    dist.all_gather_object(gathered, out)
    if is_main_process():
        out["same_on_every_rank"] = gathered[0] == gathered[1]
        with open(sys.argv[1], "w") as fh:
            json.dump(out, fh)
    dist.barrier()  # no rank tears gloo down while a peer still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
