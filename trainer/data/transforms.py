"""On-device batch preparation: uint8 → normalised float, resize, optional kornia augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .boxes import boxes_from_masks

__all__ = ["BatchTransform"]

MEAN, STD = 0.5, 0.5


class BatchTransform:
    """Moves a :class:`~trainer.data.cache.CacheDataset` batch to ``device`` and prepares it.

    Images become ``(B, 3, S, S)`` float normalised with mean 0.5 / std 0.5 (grey replicated to
    the three channels ImageNet backbones expect). With ``augment``, a random affine moves the
    image, lung mask and lesion mask together (kornia), intensity jitter touches the image only,
    and lung boxes are recomputed from the moved lung masks.
    """

    def __init__(
        self,
        device: torch.device | str,
        size: int | None = None,
        augment: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.size = size
        self.channels_last = channels_last
        self._aug = _build_augmentation() if augment else None

    def __call__(self, batch: dict[str, torch.Tensor], train: bool = False) -> dict[str, torch.Tensor]:
        nb = self.device.type == "cuda"
        img = batch["image"].to(self.device, non_blocking=nb).float().div_(255.0)  # (B, 1, S, S)
        masks = "lung" in batch  # a mask-free training batch (CacheDataset(masks=False)) has none
        if masks:
            lung = batch["lung"].to(self.device, non_blocking=nb).float()  # (B, 1, S, S)
            lesion = batch["lesion"].to(self.device, non_blocking=nb).float()  # (B, 1, S, S)
        elif train and self._aug is not None:
            raise ValueError("augmentation moves the lung and lesion masks: the batch has none")
        box = batch["box"].to(self.device, non_blocking=nb)  # (B, 4)
        src = img.shape[-1]
        if self.size is not None and self.size != src:
            img = F.interpolate(img, size=(self.size, self.size), mode="bilinear", antialias=True)
            if masks:
                lung = F.interpolate(lung, size=(self.size, self.size), mode="nearest")
                lesion = F.interpolate(lesion, size=(self.size, self.size), mode="nearest")
            box = torch.round(box.float() * (self.size / src)).long()
        if train and self._aug is not None:
            img, lung, lesion = self._aug(img, lung, lesion)
            lung, lesion = (lung > 0.5).float(), (lesion > 0.5).float()
            box, _ = boxes_from_masks(lung)
        img = ((img - MEAN) / STD).expand(-1, 3, -1, -1)  # (B, 3, S, S)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        img = img.contiguous(memory_format=fmt)
        out = {
            "image": img,
            "box": box,
            "label": batch["label"].to(self.device, non_blocking=nb),
            "lesion_known": batch["lesion_known"].to(self.device, non_blocking=nb),
            "index": batch["index"],
        }
        if masks:
            out |= {"lung": lung, "lesion": lesion}
        return out


def _build_augmentation():
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomAffine(degrees=7.0, translate=(0.05, 0.05), scale=(0.93, 1.07), p=0.8),
        K.ColorJiggle(brightness=0.1, contrast=0.1, p=0.5),
        data_keys=["input", "mask", "mask"],
    )
