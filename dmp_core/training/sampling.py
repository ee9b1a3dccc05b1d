"""The order of training pairs: :class:`EpochBatchSampler` (a resumable per-epoch
permutation) and batches built from ITC neighbourhoods (``<stage>.neighbour_batches``).

At test time the re-ranker orders a query's ITC top-k among thousands of candidates: near
misses. A batch of 32 random pairs holds few of those, so in-batch negatives (ITM's groups,
:mod:`dmp_core.losses.rerank`) are far easier than the test's. Here each batch is made of
groups of mutual ITC neighbours: an anchor image and ``group - 1`` images drawn from its
``pool`` nearest, by the stage's *initial* model (finetuning: the pretrained one), so a
group's members are each other's hard negatives.

The neighbour table is computed once, from the weights the stage starts from, so a resumed
run rebuilds the same table and the same batches (the sampler is a pure function of the
seed, the epoch and the table).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of a per-epoch permutation seeded by ``(seed, epoch)``, resumable mid-epoch.

    Global batch ``b`` of epoch ``e`` is ``perm[b*B*W:(b+1)*B*W]`` and rank ``r`` takes its
    ``r``-th slice of ``B``, so the union over ranks is the single-process batch of size
    ``B*W``. The incomplete last batch is dropped (contrastive losses need full batches).
    Items are ``(epoch, index)`` so that persistent workers learn the epoch too."""

    def __init__(self, n_items: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n_items // (batch_size * world_size)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n_items, generator=gen)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch)
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, self.steps_per_epoch):
            first = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in perm[first:first + self.batch_size].tolist()]


class EpochItems(Dataset):
    """Wraps a PairDataset: item ``(epoch, index)`` sets the dataset's epoch, then reads."""

    def __init__(self, dataset: Any):
        self.dataset, self.epoch = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
            self.epoch = epoch
        return self.dataset[index]



@torch.inference_mode()
def neighbour_table(model: torch.nn.Module, dataset: Any, pool: int, batch_size: int = 256,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """int64 [images, pool]: each training image's ``pool`` nearest other images, by the ITC
    similarity of the image to each other image's first caption (a query's ITC top list,
    as re-ranking sees it), best first."""
    was_training = model.training
    model.eval()
    try:
        images = []
        for start in range(0, dataset.num_images, batch_size):
            batch = dataset.images(np.arange(start, min(start + batch_size, dataset.num_images))).to(device)
            images.append(model.image_embed(model.encode_image(model.preprocess(batch))).float())
        first = np.array([dataset.captions_of(i)[0] for i in range(dataset.num_images)])
        texts = []
        for start in range(0, len(first), batch_size):
            ids, mask = dataset.tokens(first[start:start + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            texts.append(model.text_embed(model.encode_text(ids, mask), mask).float())
        sim = torch.cat(images) @ torch.cat(texts).T
    finally:
        model.train(was_training)
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(min(pool, sim.shape[1] - 1), dim=1).indices.cpu().numpy().astype(np.int64)


class NeighbourBatchSampler(EpochBatchSampler):
    """Batches of ``batch_size / group`` groups: an anchor (in the epoch's permuted order)
    and ``group - 1`` images drawn from its neighbour list, each image entering a batch
    once; every image contributes one of its items (a random caption with
    ``captions: all``). Deterministic given ``(seed, epoch)`` and the table."""

    def __init__(self, n_items: int, batch_size: int, *, seed: int, item_image: np.ndarray,
                 neighbours: np.ndarray, group: int, rank: int = 0, world_size: int = 1):
        super().__init__(n_items, batch_size, seed=seed, rank=rank, world_size=world_size)
        self.item_image, self.neighbours, self.group = np.asarray(item_image), neighbours, group
        if len(neighbours) < batch_size * world_size:
            raise ValueError(f"neighbour batches need at least one batch of distinct images: {len(neighbours)} "
                             f"images < batch of {batch_size * world_size}")
        self.items_of = [[] for _ in range(len(neighbours))]
        for item, image in enumerate(self.item_image.tolist()):
            self.items_of[image].append(item)

    def batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch, 7])
        anchors = self.permutation(epoch).tolist()
        global_batch, pos, out = self.batch_size * self.world_size, 0, []
        for _ in range(self.steps_per_epoch):
            batch: list[int] = []
            seen: set[int] = set()
            while len(batch) < global_batch:
                anchor = anchors[pos % len(anchors)]
                pos += 1
                image = int(self.item_image[anchor])
                if image in seen:
                    continue
                members = [image] + [int(n) for n in rng.permutation(self.neighbours[image]) if int(n) not in seen]
                for member in members[:min(self.group, global_batch - len(batch))]:
                    seen.add(member)
                    items = self.items_of[member]
                    batch.append(anchor if member == image else items[int(rng.integers(len(items)))])
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.batches(self.epoch)
        for b in range(self.start, self.steps_per_epoch):
            first = self.rank * self.batch_size
            yield [(self.epoch, i) for i in batches[b][first:first + self.batch_size]]
