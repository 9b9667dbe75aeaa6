"""eval/pixel_diversity: the RMS pairwise distance per pixel value between a prompt's evaluation images,
computed from per-prompt sums, checked against the definition computed from the pairs themselves."""

import itertools
import math

import torch

from fdfo.settings import with_overrides
from tests.test_train import tiny_run


def reference_diversity(groups: list[torch.Tensor]) -> float:
    """The definition, directly: for each group of ≥2 images, sqrt(mean over pairs of mean over pixels
    of (a − b)²); the mean over those groups."""
    values = []
    for images in groups:
        if len(images) < 2:
            continue
        pairs = [float(((a.double() - b.double()) ** 2).mean()) for a, b in itertools.combinations(images, 2)]
        values.append(math.sqrt(sum(pairs) / len(pairs)))
    return sum(values) / len(values)


def sums(groups: list[torch.Tensor]):
    flat = [g.double().flatten(1) for g in groups]
    return (torch.tensor([float(len(f)) for f in flat], dtype=torch.float64), torch.stack([f.sum(0) for f in flat]),
            torch.stack([f.pow(2).sum() for f in flat]))


def test_sums_match_the_pairwise_definition():
    from fdfo.trainer import pixel_diversity

    g = torch.Generator().manual_seed(0)
    # Prompts with 1 (left out), 2, 3 and 7 images; one group nearly collapsed onto one image.
    groups = [torch.rand(k, 3, 5, 4, generator=g) for k in (1, 2, 3, 7)]
    groups[2] = 0.5 + 1e-3 * torch.randn(3, 3, 5, 4, generator=g)
    value = pixel_diversity(*sums(groups))
    assert math.isclose(value, reference_diversity(groups), rel_tol=1e-9)
    # Identical images: 0, not a small negative under the square root.
    same = [torch.full((4, 3, 5, 4), 0.3)]
    assert pixel_diversity(*sums(same)) == 0.0
    assert pixel_diversity(*sums([torch.rand(1, 3, 5, 4, generator=g)] * 2)) is None


def test_large_images_are_compared_at_most_64_pixels_a_side():
    from fdfo.trainer import _diversity_pixels

    images = torch.rand(2, 3, 128, 96)
    x = _diversity_pixels(images)
    assert x.shape == (2, 3 * 64 * 64) and x.dtype == torch.float64
    # Area averaging (adaptive average pooling): the first output pixel is the mean of rows 0-1, columns 0-1.
    assert torch.allclose(x.view(2, 3, 64, 64)[:, :, 0, 0], images[:, :, :2, :2].double().mean((2, 3)), atol=1e-6)
    small = torch.rand(2, 3, 16, 16)
    assert torch.equal(_diversity_pixels(small), small.flatten(1).double())


def test_evaluate_logs_the_diversity_of_its_own_images(tmp_path, tiny_pipeline_dir, digit_reward_dir, monkeypatch):
    from fdfo.trainer import Trainer

    prompts = tmp_path / "eval_prompts.txt"
    prompts.write_text("a handwritten digit three\na handwritten digit seven\n")
    cfg = tiny_run(tmp_path / "run", tiny_pipeline_dir, digit_reward_dir,
                   eval={"every": 1, "num_images": 6, "metrics": []},
                   data={"eval_prompts": str(prompts)},
                   log={"plot_every": 0, "progress": False}, checkpoint={"every": 0})
    trainer = Trainer(cfg)
    seen: list[tuple[list[str], torch.Tensor]] = []
    reward = trainer.reward

    def recording_reward(p, images):
        seen.append((list(p), images.detach().cpu().clone()))
        return reward(p, images)

    trainer.reward = recording_reward

    def evaluated_groups():
        order = [q for p, _ in seen for q in p]
        images = torch.cat([im for _, im in seen])
        return [images[[i for i, q in enumerate(order) if q == prompt]] for prompt in sorted(set(order))]

    record = trainer.evaluate(0)
    groups = evaluated_groups()
    assert [len(g) for g in groups] == [3, 3]
    expected = reference_diversity(groups)
    assert expected > 0
    assert math.isclose(record["eval/pixel_diversity"], expected, rel_tol=1e-6)
    assert f"eval/pixel_diversity={expected:.4g}" in trainer._summary(record)

    # Two images for two prompts: no prompt has a pair, so no diversity is recorded.
    trainer.cfg = with_overrides(trainer.cfg, {"eval": {"num_images": 2}})
    assert "eval/pixel_diversity" not in trainer.evaluate(0)

    # Sharded over 2 ranks (simulated in this process: each rank's sums are recorded, then added up):
    # 5 images give rank 1 a padded row, which must not count.
    from fdfo import distributed
    from fdfo.trainer import pixel_diversity

    trainer.cfg = with_overrides(trainer.cfg, {"eval": {"num_images": 5}})
    seen.clear()
    trainer.evaluate(0)
    expected = reference_diversity(evaluated_groups())  # prompts with 3 and 2 images
    reduced = []
    monkeypatch.setattr(distributed, "sum_over_ranks",
                        lambda v: reduced.append(v) or (v if isinstance(v, torch.Tensor) else list(v)))
    monkeypatch.setattr(trainer, "world_size", 2)
    for rank in (0, 1):
        monkeypatch.setattr(trainer, "rank", rank)
        trainer.evaluate(0)
    total = sum(v for v in reduced if isinstance(v, torch.Tensor))
    D = (total.numel() - 4) // 2
    assert total[:2].tolist() == [3.0, 2.0]  # image counts: the padded row is left out
    assert math.isclose(pixel_diversity(total[:2], total[4:].view(2, D), total[2:4]), expected, rel_tol=1e-6)
