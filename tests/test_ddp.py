"""DDP on CPU: two processes in a gloo group.

* the all-reduce helpers give every rank the global prototypes, equal to one process on the concatenated
  batch (batch-mean and pooled), with the autograd path intact;
* one semi-supervised step of every trainer under DDP (student wrapped in DistributedDataParallel, each
  rank on its half of a fixed global batch) leaves student, teacher and method modules identical on both
  ranks, twice in a row (a second step also proves that DDP saw every parameter used in the first).

nnU-Net's own DDP launcher (`-num_gpus`) is CUDA-only; here the trainer is built as nnU-Net builds it and
its network is wrapped by hand, which exercises the same nnunet_proto code paths.
"""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import build_trainer, labeled_batch, semi_supervised_trainer_names

from nnunet_proto.ops.distributed import all_reduce_gradients_, all_reduce_sum
from nnunet_proto.ops.prototypes import labels_to_onehot, masked_average_pooling

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _gather_flat(tensors) -> list:
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors]) if tensors else torch.zeros(1)
    out = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(out, flat)
    return out


def _helpers_worker(rank: int, port: int, result_file: str) -> None:
    _init(rank, port)
    torch.manual_seed(0)
    feats = torch.randn(4, 6, 5, 5)
    labels = torch.randint(0, 3, (4, 1, 5, 5))
    labels[:2][labels[:2] == 2] = 0  # class 2 absent from rank 0's half
    half = slice(2 * rank, 2 * rank + 2)
    result = {}
    for reduction in ("batch_mean", "pooled"):
        full = masked_average_pooling(feats, labels_to_onehot(labels, 3), reduction)
        local_f = feats[half].clone().requires_grad_(True)
        local = masked_average_pooling(local_f, labels_to_onehot(labels[half], 3), reduction, all_reduce_sum)
        result[reduction] = float((local.vectors - full.vectors).abs().max())
        result[reduction + "_valid"] = bool(torch.equal(local.valid, full.valid))
        local.vectors.sum().backward()  # autograd through the collective
        result[reduction + "_grad_finite"] = bool(torch.isfinite(local_f.grad).all())
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    all_reduce_gradients_([p])
    result["grad_mean"] = p.grad.tolist()
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def test_all_reduce_helpers_give_global_prototypes(tmp_path):
    out = tmp_path / "helpers.json"
    mp.spawn(_helpers_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    r = json.loads(out.read_text())
    assert r["batch_mean"] < 1e-6 and r["pooled"] < 1e-6
    assert r["batch_mean_valid"] and r["pooled_valid"]
    assert r["batch_mean_grad_finite"] and r["pooled_grad_finite"]
    assert r["grad_mean"] == [1.5, 1.5, 1.5]


def _step_worker(rank: int, port: int, name: str, ds, payload_file: str, result_file: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    trainer = build_trainer(name, ds, "2d")  # before the group exists: nnU-Net would force CUDA otherwise
    trainer.num_epochs, trainer.num_iterations_per_epoch = 10, 10
    _init(rank, port)
    trainer.initialize()
    # what nnU-Net's initialize does under DDP (its own path hard-codes CUDA devices): wrap the network, and
    # build the loss in DDP mode (batch Dice gathered across ranks, lowest deep-supervision weight 1e-6 so
    # that DDP sees every parameter)
    trainer.is_ddp = True
    trainer.loss = trainer._build_loss()
    trainer.network = DDP(trainer.network)  # broadcasts rank 0's weights, averages gradients
    trainer._ensure_teacher()
    payload = torch.load(payload_file, weights_only=False)
    half = slice(rank * payload["half"], (rank + 1) * payload["half"])
    diffs = {}
    for step in range(2):
        b = payload["steps"][step]
        target = [t[half] for t in b["target"]] if isinstance(b["target"], list) else b["target"][half]
        trainer.dataloader_unlabeled = iter([{"data": b["unlabeled"][half]}])
        trainer.train_step({"data": b["data"][half], "target": target})
        trainer._iter_in_epoch = step + 1
        groups = {"student": list(trainer.network.module.state_dict().values()),
                  "teacher": list(trainer.teacher.module.state_dict().values()) if trainer.teacher else [],
                  "modules": list(trainer.method_modules.state_dict().values()) if trainer.method_modules else []}
        for key, tensors in groups.items():
            a, b_ = _gather_flat(tensors)
            diffs[f"{key}_{step}"] = float((a - b_).abs().max())
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(diffs, f)
    dist.destroy_process_group()


def _cat(a, b):
    return [torch.cat([x, y]) for x, y in zip(a, b)] if isinstance(a, list) else torch.cat([a, b])


@pytest.mark.parametrize("name", semi_supervised_trainer_names())
def test_one_ddp_step_keeps_ranks_identical(name, synthetic_dataset, fresh_results, tmp_path):
    source = build_trainer(name, synthetic_dataset, "2d")
    source.on_train_start()
    steps = []
    for _ in range(2):
        first, second = labeled_batch(source), labeled_batch(source)
        u1, u2 = next(source.dataloader_unlabeled)["data"], next(source.dataloader_unlabeled)["data"]
        steps.append({"data": torch.cat([first["data"], second["data"]]),
                      "target": _cat(first["target"], second["target"]), "unlabeled": torch.cat([u1, u2])})
    half = first["data"].shape[0]
    source.on_train_end()
    payload = tmp_path / "payload.pt"
    torch.save({"steps": steps, "half": half}, payload)
    out = tmp_path / "result.json"
    mp.spawn(_step_worker, args=(_free_port(), name, synthetic_dataset, str(payload), str(out)), nprocs=WORLD,
             join=True)
    diffs = json.loads(out.read_text())
    assert diffs and all(v == 0.0 for v in diffs.values()), diffs
