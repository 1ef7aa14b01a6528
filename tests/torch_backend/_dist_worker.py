"""Worker for test_distributed.py: 2 gloo ranks started by _dist_launch.launch.

Each rank writes its own result; _dist_launch.finish ends the process without interpreter
finalisation (gloo's worker threads abort it under load: see _dist_launch's docstring).
"""

import torch

import dualhess
import torch_backend as tb


def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.double().eval()
    X = torch.randn(150, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (150,))
    return model, X, y


def losses():
    """The losses the ranks analyse: plain means and sums, and two whose normaliser is not the
    sample count (kept labels of ``ignore_index``, the sum of class weights)."""
    weight = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    return {
        "mean": torch.nn.CrossEntropyLoss(),
        "sum": torch.nn.CrossEntropyLoss(reduction="sum"),
        "ignore_index": torch.nn.CrossEntropyLoss(ignore_index=-100),
        "class_weight": torch.nn.CrossEntropyLoss(weight=weight),
    }


def labels_for(name, y):
    """Every third label padded with -100 (unevenly over the shards) for ``ignore_index``."""
    if name != "ignore_index":
        return y
    y = y.clone()
    y[::3] = -100
    y[100:130] = -100  # rank 1 keeps far fewer labels than its share of samples
    return y


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
    from _dist_launch import finish, init

    rank = init()
    model, X, y = problem()
    # uneven shards: rank 0 holds 100 samples in batches of 64 + 36, rank 1 the last 50
    out = {}
    for name, loss in losses().items():
        t = labels_for(name, y)
        if rank == 0:
            shard = [(X[:64], t[:64]), (X[64:100], t[64:100])]
        else:
            shard = [(X[100:], t[100:])]
        out[name] = analyse(tb.hessian(model, loss, shard, method="func"))
    out["is_main_process"] = tb.is_main_process()
    finish(out)  # writes this rank's file, barrier, destroy_process_group, os._exit(0)


if __name__ == "__main__":
    main()
