"""Retrieval: Recall@K on hand-made similarity matrices, the contrastive loss, and the loss gathered
across 2 processes equal to one process on the concatenated batch."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from vlfuse.model import VLFuseModel
from vlfuse.tasks.retrieval import contrastive_loss, recall_from_similarity, retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]
RETRIEVAL = ["model.task=retrieval", "model.fusion.name=projection", "data.columns.text=captions"]


def test_recall_on_a_hand_made_similarity_matrix():
    # 3 images; texts 0, 1 belong to image 0, text 2 to image 1, texts 3, 4 to image 2.
    text_image = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor(
        [
            # t0   t1   t2   t3   t4
            [0.9, 0.1, 0.5, 0.2, 0.3],  # image 0: best match t0 ranks first        -> rank 0
            [0.8, 0.7, 0.6, 0.1, 0.0],  # image 1: its t2 (0.6) behind t0, t1       -> rank 2
            [0.0, 0.1, 0.2, 0.3, 0.1],  # image 2: t3 (0.3) is the top text         -> rank 0
        ]
    )
    # text -> image: t0: image 0 (0.9) top -> 0; t1: image 1 (0.7) beats image 0 (0.1) -> 1;
    # t2: image 1 (0.6) behind image 0 (0.5)? no: 0.6 > 0.5 -> 0; t3: image 2 (0.3) top -> 0;
    # t4: image 2 (0.1) behind image 0 (0.3) -> 1.
    m = recall_from_similarity(sim, text_image)
    assert m["i2t_r@1"] == pytest.approx(2 / 3)
    assert m["i2t_r@5"] == pytest.approx(1.0)
    assert m["t2i_r@1"] == pytest.approx(3 / 5)
    assert m["t2i_r@5"] == pytest.approx(1.0) and m["t2i_r@10"] == pytest.approx(1.0)
    assert m["mean_recall"] == pytest.approx((2 / 3 + 1 + 1 + 3 / 5 + 1 + 1) / 6)


def test_ties_score_their_expected_value():
    """A collapsed model (every score equal) gets chance level, neither 0 nor 1 (tie-aware recall)."""
    text_image = torch.tensor([0, 1, 2, 3])
    m = recall_from_similarity(torch.ones(4, 4), text_image)
    # one positive among 4 tied items: in the top 1 with probability 1/4, always in the top 4
    assert m["i2t_r@1"] == pytest.approx(0.25) and m["t2i_r@1"] == pytest.approx(0.25)
    assert m["i2t_r@5"] == 1.0


def test_tie_aware_recall_by_hand():
    # image 0 has 2 captions (t0, t1); image 1 has t2, t3; image 2 has t4.
    text_image = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor(
        [
            # t0   t1   t2   t3   t4
            [0.5, 0.5, 0.5, 0.5, 0.1],  # image 0: its 2 captions tie with 2 negatives at the top
            [0.9, 0.5, 0.5, 0.2, 0.5],  # image 1: t0 above; its t2 ties with t1, t4 (negatives)
            [0.3, 0.3, 0.3, 0.3, 0.3],  # image 2: all 5 tie, 1 positive
        ]
    )
    m = recall_from_similarity(sim, text_image)
    # image 0: top-1 is a negative with prob C(2,1)/C(4,1) = 1/2 -> 0.5; top-2 both negatives: C(2,2)/C(4,2)
    #   = 1/6 -> 5/6 (and 1 from K=5 on). image 1: one negative above, so K=1 -> 0; K=5: 4 places for
    #   the 3 tied -> 1. image 2: 1/5 at K=1, 1 at K=5.
    assert m["i2t_r@1"] == pytest.approx((0.5 + 0.0 + 0.2) / 3)
    assert m["i2t_r@5"] == pytest.approx(1.0)
    # text -> image: t0: image 1 (0.9) above image 0 (0.5) -> 0 at K=1; t1: image 0 ties with image 1
    # at 0.5 -> 1/2; t2: image 1 ties with image 0 at 0.5 -> 1/2; t3: images 0 (0.5) and 2 (0.3) above
    # its 0.2 -> 0; t4: image 1 (0.5) above image 2 (0.3) -> 0
    assert m["t2i_r@1"] == pytest.approx((0 + 1 / 2 + 1 / 2 + 0 + 0) / 5)
    assert m["i2t_r@10"] == pytest.approx(1.0)
    # image 0 at K=2 (not a reported cutoff): both top places negative with probability 1/6 -> 5/6
    from vlfuse.tasks.retrieval.metrics import _expected_hits

    one = torch.tensor([0])
    assert _expected_hits(one * 0, one * 0 + 2, one * 0 + 2, 2).item() == pytest.approx(5 / 6)
    assert _expected_hits(one * 0 + 1, one * 0 + 2, one * 0 + 2, 2).item() == pytest.approx(0.5)


def _sort_based_recall(similarity, text_image, k):
    """The reference computation (open_clip / CLIP_benchmark style): sort, rank of the first positive."""
    positive = text_image[None, :] == torch.arange(similarity.shape[0])[:, None]
    i2t = []
    for row, pos in zip(similarity, positive, strict=True):
        order = torch.argsort(row, descending=True)
        i2t.append(float(pos[order][:k].any()))
    t2i = []
    for t, row in enumerate(similarity.T):
        order = torch.argsort(row, descending=True)
        t2i.append(float(int(text_image[t]) in order[:k].tolist()))
    return sum(i2t) / len(i2t), sum(t2i) / len(t2i)


def test_without_ties_recall_equals_the_sort_based_reference():
    torch.manual_seed(1)
    for _ in range(5):
        images = F.normalize(torch.randn(30, 16), dim=-1)
        owner = torch.randint(0, 30, (70,))
        texts = F.normalize(images[owner] + 1.5 * torch.randn(70, 16), dim=-1)
        sim = images @ texts.T
        got = retrieval_metrics(images, texts, owner, chunk=7)
        for k in (1, 5, 10):
            i2t, t2i = _sort_based_recall(sim, owner, k)
            # images without captions count as queries in the reference but have no positive: skip them
            has_text = torch.zeros(30, dtype=torch.bool)
            has_text[owner] = True
            if has_text.all():
                assert got[f"i2t_r@{k}"] == pytest.approx(i2t)
            assert got[f"t2i_r@{k}"] == pytest.approx(t2i)


def test_recall_at_k_cutoffs():
    # 12 images, one text each; the true image of text t sits at rank t (0-based) for every t.
    n = 12
    sim = torch.zeros(n, n)
    for t in range(n):
        order = [t] + [j for j in range(n) if j != t]
        # the true image gets rank t: t wrong images score above it
        scores = torch.arange(n, 0, -1).float()
        ranked = order[1 : t + 1] + [t] + order[t + 1 :]
        sim[ranked, t] = scores
    m = recall_from_similarity(sim, torch.arange(n))
    assert m["t2i_r@1"] == pytest.approx(1 / 12)
    assert m["t2i_r@5"] == pytest.approx(5 / 12)
    assert m["t2i_r@10"] == pytest.approx(10 / 12)


def test_retrieval_metrics_from_embeddings_in_chunks():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 8), dim=-1)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])  # text -> image
    texts = F.normalize(images[owner] + 0.7 * torch.randn(len(owner), 8), dim=-1)
    expected = recall_from_similarity(images @ texts.T, owner)
    assert 0 < expected["t2i_r@1"] < 1  # a case where ranks differ, so a wrong chunk offset would show
    for chunk in (1, 3, 1024):
        got = retrieval_metrics(images, texts, owner, chunk=chunk)
        assert got["images"] == 6 and got["texts"] == 10 and got["chance_r1"] == pytest.approx(1 / 6)
        for k, v in expected.items():
            assert got[k] == pytest.approx(v), (chunk, k)


def test_evaluation_encodes_each_image_once_and_matches_recall_by_hand(tmp_path):
    from helpers import write_flickr_layout

    from vlfuse.data.loading import load_split
    from vlfuse.tasks.retrieval import RetrievalTask

    folder = write_flickr_layout(tmp_path)
    cfg = tiny_config(*RETRIEVAL, f"data.dataset={folder}", "data.columns.text=alt_text")
    model = VLFuseModel(cfg.model).eval()
    task = RetrievalTask()
    dataset = task.build_dataset(cfg, model, "test", train=False)
    assert len(dataset) == 8 and dataset.max_captions == 4  # five captions a row, one of them empty
    batch = task.collator(model, train=False)([dataset[i] for i in range(8)])
    assert batch["pixel_values"].shape[0] == 8 and batch["input_ids"].shape[0] == 32
    with torch.no_grad():
        got = task.metrics(task.eval_values(model(**batch), batch))
    # by hand: every row's image and its non-empty captions, embedded through the public API
    rows = load_split(cfg.data, "test")
    captions = [[c for c in row if c.strip()] for row in rows["alt_text"]]
    images = model.embed_images(list(rows["image"]))
    texts = model.embed_texts([c for row in captions for c in row])
    owner = torch.arange(8).repeat_interleave(torch.tensor([len(c) for c in captions]))
    expected = recall_from_similarity(images @ texts.T, owner)
    assert got["images"] == 8 and got["texts"] == 32
    for k, v in expected.items():
        assert got[k] == pytest.approx(v), k


@pytest.mark.parametrize("cached", [False, True])
def test_a_bad_image_drops_out_of_retrieval_metrics_with_its_captions(tmp_path, cached):
    import datasets
    from accelerate import Accelerator
    from PIL import Image

    from vlfuse.data.feature_cache import cached_dataset
    from vlfuse.tasks.retrieval import RetrievalTask

    folder = tmp_path / "with_bad"
    (folder / "data").mkdir(parents=True)
    good = [Image.new("RGB", (30, 30), c) for c in ((200, 0, 0), (0, 200, 0))]
    rows = {
        "image": [good[0], {"bytes": b"not an image", "path": None}, good[1]],
        "text": [["red", "a red one"], ["broken", "x"], ["green"]],
    }
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "text": datasets.Sequence(datasets.Value("string"))}
    )
    rows["image"] = [
        im if isinstance(im, dict) else {"bytes": _png(im), "path": None} for im in rows["image"]
    ]
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "test-00000-of-00001.parquet")
    )
    cfg = tiny_config(*RETRIEVAL, f"data.dataset={folder}", "data.columns.text=text")
    model = VLFuseModel(cfg.model).eval()
    task = RetrievalTask()
    dataset = task.build_dataset(cfg, model, "test", train=False)
    if cached:  # the frozen towers' features from the cache; the bad row gets blank ones
        dataset = task.over_examples(
            dataset,
            lambda base: cached_dataset(
                model, base, "test", tmp_path / "c", "float32", 2, Accelerator(cpu=True)
            ),
        )
    batch = task.collator(model, train=False)([dataset[i] for i in range(3)])
    assert ("pixel_values" in batch) != cached
    assert batch["valid"].tolist() == [True, False, True] and int(batch["bad_rows"]) == 1
    assert batch["text_valid"].tolist() == [[True, True], [False, False], [True, False]]
    with torch.no_grad():
        m = task.metrics(task.eval_values(model(**batch), batch))
    assert m["images"] == 2 and m["texts"] == 3


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_contrastive_loss_is_symmetric_infonce():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    loss, parts = contrastive_loss(img, txt, scale)
    logits = scale * img @ txt.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # perfectly aligned pairs give a lower loss than shuffled ones
    assert contrastive_loss(img, img, scale)[0] < contrastive_loss(img, img.flip(0), scale)[0]


def _multi_positive_by_hand(img, txt, scale, ids):
    """Each anchor's loss: minus the log of its softmax probability summed over its positives."""
    logits = scale * img @ txt.T
    total = 0.0
    for direction in (logits, logits.T):
        p = direction.softmax(dim=1)
        for i in range(len(ids)):
            total += -math.log(sum(p[i, j].item() for j in range(len(ids)) if ids[j] == ids[i]))
    return total / (2 * len(ids))


def test_captions_of_one_image_are_positives_not_negatives():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(3, 8), dim=-1)
    ids = torch.tensor([0, 1, 0, 2])  # rows 0 and 2: two captions of image 0
    img = base[ids]
    txt = F.normalize(img + 0.5 * torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    loss, _ = contrastive_loss(img, txt, scale, ids)
    assert loss.item() == pytest.approx(_multi_positive_by_hand(img, txt, scale, ids.tolist()), rel=1e-5)
    plain = contrastive_loss(img, txt, scale)[0]  # arange labels: t2 is a negative of image row 0
    assert abs(plain.item() - loss.item()) > 1e-3
    # without repeats the multi-positive loss is plain InfoNCE
    distinct = torch.arange(4)
    assert contrastive_loss(img, txt, scale, distinct)[0].item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.multiprocess
@pytest.mark.parametrize("with_ids", [False, True], ids=["pairs", "repeated_images"])
def test_gathered_loss_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path, with_ids):
    out = tmp_path / "ranks.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    result = subprocess.run(
        [
            accelerate,
            "launch",
            "--config_file",
            str(ROOT / "recipes/configs/accelerate/cpu_2proc.yaml"),
            str(ROOT / "tests/scripts/retrieval_gather_loss.py"),
            str(out),
            *(["ids"] if with_ids else []),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["sizes"] == [3, 5]

    # The same global batch on one process (the script's data, rebuilt here).
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(8, 16, generator=generator), dim=-1)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    log_scale = torch.tensor(2.5, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 4, 0]) if with_ids else None
    loss, _ = contrastive_loss(images, texts, log_scale.exp(), ids)
    loss.backward()
    if with_ids:  # captions of one image on different ranks are each other's positives
        by_hand = _multi_positive_by_hand(
            images.detach(), texts.detach(), log_scale.exp().item(), ids.tolist()
        )
        assert loss.item() == pytest.approx(by_hand, rel=1e-5)

    # DDP averages gradients over ranks: the ranks' mean loss and mean-of-ranks gradients must equal
    # the one-process ones, with every rank's negatives taken from the other rank too.
    world = 2
    assert sum(r["loss"] for r in ranks) / world == pytest.approx(loss.item(), rel=1e-5)
    assert sum(r["grad_log_scale"] for r in ranks) / world == pytest.approx(log_scale.grad.item(), rel=1e-5)
    grad_images = torch.cat([torch.tensor(r["grad_images"]) for r in ranks]) / world
    grad_texts = torch.cat([torch.tensor(r["grad_texts"]) for r in ranks]) / world
    torch.testing.assert_close(grad_images, images.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_texts, texts.grad, rtol=1e-5, atol=1e-7)
    # ... and a loss without the other rank's negatives would differ (the check can fail).
    alone = contrastive_loss(
        images[:3].detach(), texts[:3].detach(), log_scale.exp(), None if ids is None else ids[:3]
    )[0].item()
    assert abs(alone * 3 / 8 * world - ranks[0]["loss"]) > 1e-3


def test_retrieval_model_embeds_and_predicts_similarity(tmp_path):
    from PIL import Image

    cfg = tiny_config(*RETRIEVAL, "model.fusion.dim=24")
    model = VLFuseModel(cfg.model)
    images = [Image.new("RGB", (90, 40), (200, 20, 20)), Image.new("RGB", (30, 70), (20, 20, 200))]
    texts = ["a red circle", "a blue square", "a green triangle"]
    out = model.predict(images, texts)
    assert out["image_embeds"].shape == (2, 24) and out["text_embeds"].shape == (3, 24)
    assert torch.allclose(out["image_embeds"].norm(dim=-1), torch.ones(2), atol=1e-5)
    torch.testing.assert_close(out["similarity"], out["image_embeds"] @ out["text_embeds"].T)
    assert torch.equal(model.embed_texts(texts), out["text_embeds"])
    model.save_pretrained(tmp_path / "saved")
    loaded = VLFuseModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.embed_images(images), out["image_embeds"])
    assert math.isclose(loaded.head.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    with pytest.raises(ValueError, match="needs images, texts or both"):
        model.predict()


def test_flickr_layouts_load_by_config_alone(tmp_path):
    """AnyModal/flickr30k's layout (image + alt_text list, three splits) trains; lmms-lab/flickr30k's
    (caption list, one "test" split) is read through a row slice; empty captions are dropped and counted."""
    from accelerate.state import AcceleratorState
    from helpers import write_flickr_layout

    from vlfuse.tasks.retrieval import RetrievalCollator, RetrievalTask
    from vlfuse.training import train

    folder = write_flickr_layout(tmp_path)
    cfg = tiny_config(*RETRIEVAL, f"data.dataset={folder}", "data.columns.text=alt_text")
    model = VLFuseModel(cfg.model)
    dataset = RetrievalTask().build_dataset(cfg, model, "test[2:6]", train=True)
    assert dataset.counts["rows"] == 4 and dataset.counts["empty_caption"] == 4  # one "" per row
    assert len(dataset) == 16 and dataset.counts["images"] == 4
    assert "4 distinct images" in dataset.describe()
    assert len(dataset.by_image()) == 4 and "up to 4 captions each" in dataset.by_image().describe()
    batch = RetrievalCollator(model.text_encoder.tokenize, keep_bad=True)([dataset[i] for i in range(6)])
    assert batch["image_ids"].tolist() == [0, 0, 0, 0, 1, 1] and batch["pixel_values"].shape[0] == 6

    AcceleratorState._reset_state(True)
    out = tmp_path / "run"
    metrics = train(
        tiny_config(
            *RETRIEVAL,
            f"data.dataset={folder}",
            "data.columns.text=alt_text",
            "data.eval_split=[validation,test]",
            "train.batch_size=4",
            "train.max_steps=2",
            f"train.output_dir={out}",
        )
    )
    assert metrics["validation"]["images"] == 8 and metrics["validation"]["texts"] == 32
    assert metrics["test"]["chance_r1"] == pytest.approx(1 / 8)
    AcceleratorState._reset_state(True)


def test_image_id_column_groups_rows_of_one_image(tmp_path):
    import datasets
    from PIL import Image

    from vlfuse.tasks.retrieval import RetrievalTask

    folder = tmp_path / "coco_style"
    (folder / "data").mkdir(parents=True)
    images = [Image.new("RGB", (30, 30), c) for c in ((200, 0, 0), (0, 200, 0))]
    rows = {
        "image": [images[0], images[0], images[1]],
        "caption": ["red", "a red one", "green"],
        "iid": [7, 7, 9],
    }
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    cfg = tiny_config(*RETRIEVAL, f"data.dataset={folder}", "data.columns={text: caption, image_id: iid}")
    dataset = RetrievalTask().build_dataset(cfg, VLFuseModel(cfg.model), "test", train=True)
    assert [int(dataset[i].image_id) for i in range(3)] == [0, 0, 1] and dataset.counts["images"] == 2
    per_image = dataset.by_image()  # evaluation: the two rows of image 7 are one image with two captions
    assert len(per_image) == 2 and per_image[0].texts == ["red", "a red one"]
    assert per_image[1].texts == ["green", ""] and per_image[1].text_valid.tolist() == [True, False]
