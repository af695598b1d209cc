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


def _global_batch_worker(rank: int, port: int, out_dir: str) -> None:
    from xmodal.matching import _itm_inputs
    from xmodal.training.losses import GlobalBatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        batch = GlobalBatch()
        # padded lengths differ per process (3 and 5 tokens): gathered to 5, zero-padded, gradients back to each rank
        hidden = torch.full((2, 3 + 2 * rank, 4), float(rank + 1), requires_grad=True)
        gathered = batch.gather(hidden)
        (gathered * torch.arange(1.0, 5.0).view(4, 1, 1)).sum().backward()
        # ITM: each process's two captions are identical, so every negative must come from the other process
        config = _itm_config()
        model = _ItmModel(config)
        input_ids = torch.tensor([[2, 10 + rank, 3]] * 2)
        embeds = F.normalize(torch.randn(2, 8), dim=-1)
        texts, masks, image_index, labels, _ = _itm_inputs(
            model, torch.randn(2, 3, 8), torch.ones_like(input_ids), input_ids, embeds, embeds, batch
        )
        torch.save(
            {"gathered": gathered.detach(), "grad": hidden.grad, "image_index": image_index, "labels": labels},
            os.path.join(out_dir, f"global{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _itm_config():
    from xmodal import XModalConfig

    return XModalConfig.from_preset("tiny", itm_sampling="all", projection_dim=8)


class _ItmModel(torch.nn.Module):
    """The parts of a model `_itm_inputs` reads: its config and the similarity logits (matrix and per pair)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return 10.0 * text_embeds @ image_embeds.t()

    def pair_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return 10.0 * (text_embeds * image_embeds).sum(dim=-1)


def test_global_batch_gathers_padded_tensors_and_itm_draws_negatives_from_other_processes(tmp_path):
    mp.spawn(_global_batch_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"global{rank}.pt")
        gathered = result["gathered"]
        assert gathered.shape == (4, 5, 4)
        assert (gathered[:2, :3] == 1).all() and (gathered[:2, 3:] == 0).all() and (gathered[2:] == 2).all()
        # d/d(own rows) of the sum over both processes' losses: rows weighted 1,2 (rank 0) or 3,4 (rank 1), twice
        expected = 2 * torch.arange(2 * rank + 1.0, 2 * rank + 3.0).view(2, 1, 1).expand(2, 3 + 2 * rank, 4)
        torch.testing.assert_close(result["grad"], expected)
        own = range(2 * rank, 2 * rank + 2)
        image_index, labels = result["image_index"], result["labels"]
        # positives, then texts with a negative image, then images with a negative text (ALBEF's 3B pairs)
        assert image_index[:2].tolist() == list(own) and labels.tolist() == [1, 1, 0, 0, 0, 0]
        assert all(int(index) not in own for index in image_index[2:4])
