"""Global-batch contrastive loss: two gloo processes with B pairs each train exactly like one process with 2B."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xmodal import contrastive_loss
from xmodal.training.losses import ContrastiveLoss

WORLD_SIZE, BATCH, DIM, FEATURES = 2, 4, 8, 6


def _model() -> torch.nn.ModuleDict:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"image": torch.nn.Linear(FEATURES, DIM), "text": torch.nn.Linear(FEATURES, DIM)})


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(WORLD_SIZE * BATCH, FEATURES, generator=generator),
        torch.randn(WORLD_SIZE * BATCH, FEATURES, generator=generator),
    )


def _loss(model: torch.nn.ModuleDict, images: torch.Tensor, texts: torch.Tensor, loss_fn: ContrastiveLoss):
    image_embeds = F.normalize(model["image"](images), dim=-1)
    text_embeds = F.normalize(model["text"](texts), dim=-1)
    return loss_fn(image_embeds, text_embeds, torch.tensor(10.0))


def _worker(rank: int, port: int, local_loss: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        model = _model()
        images, texts = _data()
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        loss = _loss(model, images[rows], texts[rows], ContrastiveLoss(label_smoothing=0.1, local_loss=local_loss))
        loss.backward()
        grads = {}
        for name, parameter in model.named_parameters():
            dist.all_reduce(parameter.grad)  # what DDP does: the mean of the processes' gradients
            grads[name] = parameter.grad / WORLD_SIZE
        losses = [torch.zeros(()) for _ in range(WORLD_SIZE)]
        dist.all_gather(losses, loss.detach())
        torch.save({"loss": torch.stack(losses).mean(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("local_loss", [False, True], ids=["global_loss", "local_loss"])
def test_two_processes_match_one_process_with_the_combined_batch(tmp_path, local_loss):
    mp.spawn(_worker, args=(_free_port(), local_loss, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    model = _model()
    images, texts = _data()
    loss = _loss(model, images, texts, ContrastiveLoss(label_smoothing=0.1))
    loss.backward()
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], parameter.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_single_process_equals_the_model_loss():
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    expected = contrastive_loss(10.0 * text @ image.t(), label_smoothing=0.2)
    torch.testing.assert_close(ContrastiveLoss(label_smoothing=0.2)(image, text, 10.0), expected)
    with pytest.raises(ValueError, match="must be pairs"):
        ContrastiveLoss()(image, text[:4], 10.0)


def test_pretraining_model_takes_the_global_batch_loss(tester):
    from xmodal import XModalForPreTraining

    contrastive_only = {
        "itm_loss_weight": 0,
        "mlm_loss_weight": 0,
        "mim_loss_weight": 0,
        "captioning_loss_weight": 0,
        "vqa_loss_weight": 0,
    }
    model = XModalForPreTraining(tester.get_config(**contrastive_only)).eval()
    inputs = tester.get_inputs()
    with torch.no_grad():
        default = model(**inputs, return_loss=True).loss
        hooked = model(**inputs, return_loss=True, contrastive_loss_fn=ContrastiveLoss()).loss
    torch.testing.assert_close(hooked, default)
    queued = XModalForPreTraining(tester.get_config(**contrastive_only, queue_size=4))
    with pytest.raises(ValueError, match="momentum queue"):
        queued(**inputs, return_loss=True, contrastive_loss_fn=ContrastiveLoss())
