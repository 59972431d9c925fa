import json

import numpy as np
import pytest
import torch

from trainer.data.boxes import boxes_from_masks
from trainer.data.cache import CacheDataset, CacheError, open_cache, write_cache
from trainer.data.transforms import BatchTransform

CLASSES = ["No Finding", "Effusion"]


def _arrays(n=10, s=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, s, s), dtype=np.uint8)
    lungs = np.zeros((n, s, s), np.uint8)
    lungs[:, 4:28, 6:26] = 1
    lungs[0] = 0  # no lung found → whole-image fallback box
    manifest = [
        {
            "image_id": f"img{i}",
            "patient_id": f"p{i // 2}",
            "label": CLASSES[i % 2],
            "split": ("train", "val", "test")[i % 3],
            "source_path": f"src/{i}.png",
        }
        for i in range(n)
    ]
    return images, lungs, manifest


def _write(path, **kw):
    images, lungs, manifest = _arrays()
    args = dict(
        images=images,
        lung_masks=lungs,
        manifest=manifest,
        classes=CLASSES,
        task="ne",
        source="unit",
        segmenter="none",
        data_access="synthetic",
    )
    args.update(kw)
    return write_cache(path, **args)


def test_roundtrip_and_memory_mapping(tmp_path):
    images, lungs, _ = _arrays()
    path = _write(tmp_path / "c")
    cache = open_cache(path, classes=CLASSES)
    assert isinstance(cache.images, np.memmap)
    assert np.array_equal(cache.images, images)
    assert cache.lung_boxes[1].tolist() == [6, 4, 20, 24]
    assert cache.lung_boxes[0].tolist() == [0, 0, 32, 32]  # fallback
    assert cache.labels.tolist() == [i % 2 for i in range(10)]
    header = json.loads((path / "header.json").read_text())
    assert {"size", "classes", "task", "source", "segmenter", "created", "content_hash"} <= header.keys()


def test_dataset_single_and_batched_reads_agree(tmp_path):
    cache = open_cache(_write(tmp_path / "c"))
    ds = CacheDataset(cache, "train")
    assert len(ds) == 4  # rows 0, 3, 6, 9
    batch = ds.__getitems__([3, 0, 2])  # unsorted on purpose
    for j, i in enumerate([3, 0, 2]):
        one = ds[i]
        for k in ("image", "lung", "box", "label", "index"):
            assert torch.equal(batch[k][j], one[k]), k
    assert batch["image"].shape == (3, 1, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["index"].tolist() == [9, 0, 6]


def test_mask_free_training_batches_carry_the_same_image_box_and_label(tmp_path):
    cache = open_cache(_write(tmp_path / "c"))
    full = CacheDataset(cache, "train").__getitems__([3, 0, 2])
    lean = CacheDataset(cache, "train", masks=False).__getitems__([3, 0, 2])
    assert set(full) - set(lean) == {"lung", "lesion"}
    for k in lean:
        assert torch.equal(lean[k], full[k]), k
    prep = BatchTransform("cpu", size=64)
    a, b = prep(full, train=True), prep(lean, train=True)
    assert "lung" not in b and all(torch.equal(a[k], b[k]) for k in ("image", "box", "label"))
    with pytest.raises(ValueError, match="augmentation.*masks"):
        BatchTransform("cpu", augment=True)(lean, train=True)


def test_the_trainers_loader_leaves_masks_out_of_training_batches_only(tmp_path):
    from trainer.config import TrialConfig
    from trainer.loop import split_loader

    cache = open_cache(_write(tmp_path / "c"))
    cfg = TrialConfig.from_dict({"data": {"cache": str(cache.path)}})
    dev = torch.device("cpu")
    assert "lung" not in next(iter(split_loader(cache, "train", cfg, dev)))
    assert "lesion" in next(iter(split_loader(cache, "val", cfg, dev)))
    aug = TrialConfig.from_dict({"data": {"cache": str(cache.path), "augment": True}})
    assert "lung" in next(iter(split_loader(cache, "train", aug, dev)))  # augmentation moves the masks


def test_existing_cache_is_not_overwritten_silently(tmp_path):
    path = _write(tmp_path / "c")
    with pytest.raises(CacheError, match="already exists"):
        _write(path)
    _write(path, overwrite=True)
    assert not list(tmp_path.glob(".c.*"))  # no temporary leftovers


def test_failed_write_leaves_nothing(tmp_path):
    images, lungs, manifest = _arrays()
    manifest[4]["label"] = "Pneumothorax"
    with pytest.raises(CacheError, match=r"row 4 \(img4\): label 'Pneumothorax'"):
        _write(tmp_path / "c", manifest=manifest)
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())


def test_duplicate_ids_rejected(tmp_path):
    images, lungs, manifest = _arrays()
    manifest[1]["image_id"] = "img0"
    with pytest.raises(CacheError, match="duplicate image_id"):
        _write(tmp_path / "c", manifest=manifest)


def test_missing_incomplete_and_corrupted_caches(tmp_path):
    with pytest.raises(CacheError, match="not a directory"):
        open_cache(tmp_path / "nope")
    path = _write(tmp_path / "c")
    with open(path / "images.npy", "r+b") as f:  # flip one pixel byte
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CacheError, match="content hash mismatch"):
        open_cache(path)
    (path / "lung_masks.npy").write_bytes(b"garbage")
    with pytest.raises(CacheError, match=r"lung_masks.npy: unreadable or corrupted"):
        open_cache(path)
    (path / "header.json").unlink()
    with pytest.raises(CacheError, match="header.json: missing"):
        open_cache(path)


def test_cache_for_another_task(tmp_path):
    path = _write(tmp_path / "c")
    with pytest.raises(CacheError, match=r"built for classes .* \(2\).* asks for .* \(3\)"):
        open_cache(path, classes=["No Finding", "Effusion", "Pneumothorax"])


def test_boxes_from_masks():
    m = torch.zeros(3, 1, 10, 12)
    m[0, 0, 2:5, 3:9] = 1
    m[1, 0, 1, 1] = 1
    m[1, 0, 8, 10] = 1  # union of two blobs
    boxes, empty = boxes_from_masks(m)
    assert boxes.tolist() == [[3, 2, 6, 3], [1, 1, 10, 8], [0, 0, 12, 10]]
    assert empty.tolist() == [False, False, True]


def test_batch_transform_normalises_resizes_and_augments_together(tmp_path):
    cache = open_cache(_write(tmp_path / "c"))
    batch = CacheDataset(cache, "train").__getitems__([0, 1, 2, 3])
    prep = BatchTransform("cpu", size=64)
    b = prep(batch)
    assert b["image"].shape == (4, 3, 64, 64)
    assert float(b["image"].min()) >= -1.0 and float(b["image"].max()) <= 1.0
    assert b["box"][1].tolist() == [12, 8, 40, 48]  # scaled ×2

    # image == lung mask: after a random affine both must still coincide
    batch = dict(batch)
    batch["image"] = batch["lung"] * 255
    torch.manual_seed(0)
    aug = BatchTransform("cpu", augment=True)
    b = aug(batch, train=True)
    bright = b["image"][:, :1] > 0
    agree = (bright == (b["lung"] > 0)).float().mean()
    assert agree > 0.97
    recomputed, _ = boxes_from_masks(b["lung"])
    assert torch.equal(recomputed, b["box"])
