"""Which loss term drives a trained semi-supervised model: gradient norm of every weighted term.

    python scripts/term_gradients.py -d 27 -c 2d -p nnUNetPlans_cpu -f 8 -tr nnUNetTrainerMSPA [--batches 4]
        [--checkpoint checkpoint_final.pth] [--device cpu]

Loads <nnUNet_results>/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>/<checkpoint> into the trainer,
draws labeled and unlabeled batches from the fold's own loaders and prints, per term, the norm of the
gradient of its weighted value (the weights of the checkpoint's training position) over the trainable
parameters, averaged over the batches, next to the supervised loss and nnU-Net's clipping norm (12). The
same probe runs during training on the first step of every epoch (`ssl_gradnorm_*` in progress.png); this
script asks a finished model. Nothing is written to the results folder (the trainer's own output goes
to a temporary folder). Export nnUNet_extTrainer as for nnUNetv2_train; set nnUNet_results to a benchmark's
`<results-dir>/nnUNet_results` to probe its runs.
"""
import argparse
import contextlib
import os
import tempfile
from typing import Dict, Iterator, List


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("-tr", "--trainer", required=True)
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    p.add_argument("--batches", type=int, default=4, help="labeled + unlabeled batches averaged over")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    results = os.environ.get("nnUNet_results")
    if not results:
        raise SystemExit("nnUNet_results is not set: point it at the results folder that holds the model")
    with tempfile.TemporaryDirectory() as scratch:
        # the trainer writes logs from its constructor on: give it a scratch results folder (nnU-Net reads
        # nnUNet_results when it builds the output folder) and read the checkpoint from the real one
        # (uncompiled: a compiled backward cannot be retained for one gradient per term)
        with environment(nnUNet_results=scratch, nnUNet_compile="f"):
            rows = probe(a, results)
    print("\n".join(rows))


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set these environment variables for the body, then restore each one (or remove it if it was unset)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def probe(a: argparse.Namespace, results: str) -> List[str]:
    """The report lines for ``main``; ``results`` holds the model, nnUNet_results points at a scratch folder."""
    import numpy as np
    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_proto.training.base_trainer import CHECKPOINT_KEY, _finish, nnUNetTrainerSemiSupervised
    from nnunet_proto.training.compat import get_trainer_from_args
    from nnunet_proto.training.precision import step_autocast
    from nnunet_proto.training.progress import CLIP_NORM

    checkpoint = os.path.join(results, maybe_convert_to_dataset_name(a.dataset),
                              f"{a.trainer}__{a.plans}__{a.configuration}", f"fold_{a.fold}", a.checkpoint)
    if not os.path.isfile(checkpoint):
        raise SystemExit(f"no checkpoint {checkpoint}: train the fold first, or set nnUNet_results / --checkpoint")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if CHECKPOINT_KEY not in saved:
        raise SystemExit(f"{checkpoint} was not written by an nnunet_proto semi-supervised trainer")
    torch.manual_seed(0)
    trainer = get_trainer_from_args(str(a.dataset), a.configuration, a.fold, a.trainer, a.plans,
                                    device=torch.device(a.device))
    if not isinstance(trainer, nnUNetTrainerSemiSupervised):
        raise SystemExit(f"{a.trainer} is not a semi-supervised trainer of nnunet_proto: it has no loss terms")
    # the schedule the model was trained with (benchmarks set their own): time constants and weights follow it
    trainer.num_epochs = saved[CHECKPOINT_KEY]["num_epochs"]
    trainer.num_iterations_per_epoch = saved[CHECKPOINT_KEY]["num_iterations_per_epoch"]
    trainer.on_train_start()
    values: Dict[str, List[float]] = {}
    try:
        trainer.load_checkpoint(checkpoint)
        if hasattr(trainer, "enter_last_stage") and trainer.current_epoch >= trainer.num_epochs:
            trainer.enter_last_stage()
        dev = trainer.device
        for _ in range(a.batches):
            batch = next(trainer.dataloader_train)
            data_l, target = batch["data"].to(dev), batch["target"]
            target = [t.to(dev) for t in target] if isinstance(target, list) else target.to(dev)
            data_u = next(trainer.dataloader_unlabeled)["data"].to(dev)
            trainer.network.zero_grad(set_to_none=True)
            trainer._probe_terms = {}  # compute_loss keeps the attached weighted terms (as a probe step does)
            with step_autocast(dev, trainer.precision):
                total, logs = trainer.compute_loss(data_l, target, data_u)
            terms, trainer._probe_terms = {**trainer._probe_terms, "total": total}, None
            for k, v in trainer.probe_gradient_norms(terms).items():
                values.setdefault(k[len("gradnorm_"):], []).append(float(v))
            for k, v in logs.items():
                if k.startswith(("loss_", "weight_")):
                    values.setdefault(k, []).append(float(v))
    finally:
        for loader in (trainer.dataloader_train, trainer.dataloader_unlabeled, trainer.dataloader_val):
            _finish(getattr(loader, "loader", loader))
    mean = {k: float(np.mean(v)) for k, v in values.items()}
    sup = max(mean["sup"], 1e-12)
    rows = [f"{a.trainer} fold {a.fold}, {a.checkpoint} (epoch {trainer.current_epoch}, progress "
            f"{trainer.progress:.2f}), {a.batches} batches; nnU-Net clips the total at {CLIP_NORM:g}",
            "| term | weight | loss value | gradient norm of weight x term | x supervised |", "|---|---|---|---|---|"]
    for n in ["sup", *trainer.method.term_names]:
        w = "1" if n == "sup" else f"{mean['weight_' + n]:.4g}"
        rows.append(f"| {n} | {w} | {mean['loss_' + n]:.4g} | {mean[n]:.3g} | {mean[n] / sup:.2f} |")
    rows.append(f"| total | | | {mean['total']:.3g} | {mean['total'] / sup:.2f} |")
    return rows


if __name__ == "__main__":
    main()
