import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST

from transferlab import TrainConfig, train
from transferlab.data.cache import CacheKey, Pass, Store, fill
from transferlab.data.index import file_digest, index_folder
from transferlab.data.transforms import eval_transform, load_for, train_transform
from transferlab.model.network import TransferNet, fold_batchnorm
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec

SIZE = 96


@pytest.fixture(scope="module")
def net():
    spec = get_spec("efficientnet_lite0")
    backbone, _ = create_backbone(spec)
    return TransferNet(spec, backbone, num_classes=2).eval()


def _key(**change):
    key = CacheKey(
        "efficientnet_lite0", "abc", SIZE, "bicubic", "crop0.875", (0.5,) * 3, (0.5,) * 3, "none", 1, "pooled"
    )
    return dataclasses.replace(key, **change)


def extract(net, samples, tf, stores, **kw):
    done = fill(net, samples, [file_digest(s.path) for s in samples], stores, Pass(tf, workers=0, **kw))
    return done.digests, done.computed


def test_cached_features_and_prefix_give_the_plain_paths_outputs(net, small_data, tmp_path):
    samples = index_folder(small_data).val[:6]
    tf = eval_transform(net.spec, SIZE)
    stores = {"pooled": Store(tmp_path, _key()), "prefix6": Store(tmp_path, _key(output="prefix6"))}
    digests, computed = extract(net, samples, tf, stores, batch_size=4)
    assert computed == 6
    x = torch.stack([tf(load_for(tf, s.path)) for s in samples])  # the plain path's decoding
    with torch.no_grad():
        feats, logits = net.features(x), net(x)
        pooled = torch.from_numpy(np.stack([stores["pooled"].load(d)[0] for d in digests]).astype(np.float32))
        prefix = torch.from_numpy(np.stack([stores["prefix6"].load(d)[0] for d in digests]).astype(np.float32))
        # float16 storage: agreement to half precision
        assert torch.allclose(pooled, feats, rtol=2e-3, atol=2e-3)
        assert torch.allclose(net.top(pooled, len(net.groups)), logits, atol=5e-3)
        assert torch.allclose(net.top(prefix, 6), logits, atol=5e-3)
    assert prefix.shape[1:] == net.forward_groups(x[:1], 0, 6).shape[1:]
    assert stores["pooled"].load(digests[0]).dtype == np.float16


def test_augmented_views_are_fixed_per_image_and_distinct(net, small_data, tmp_path):
    samples = index_folder(small_data).train[:2]
    tf = train_transform(net.spec, SIZE, "keras")
    a = {"pooled": Store(tmp_path / "a", _key(augment="keras", views=3))}
    b = {"pooled": Store(tmp_path / "b", _key(augment="keras", views=3))}
    da, _ = extract(net, samples, tf, a)
    extract(net, samples, tf, b)
    va, vb = a["pooled"].load(da[0]), b["pooled"].load(da[0])
    assert va.shape == (3, 1280) and np.array_equal(va, vb)  # reproducible
    assert not np.array_equal(va[0], va[1])  # views differ


def test_view_0_of_an_augmented_store_of_several_views_is_the_clean_one(net, small_data, tmp_path):
    """The probe's view: view 0 is the image as validation sees it, the others augmented; a single view stays
    augmented (it is all the training sees)."""
    samples = index_folder(small_data).train[:3]
    tf, clean = train_transform(net.spec, SIZE, "keras"), eval_transform(net.spec, SIZE)
    several = {"pooled": Store(tmp_path, _key(augment="keras", views=3))}
    one = {"pooled": Store(tmp_path, _key(augment="keras", views=1))}
    digests, _ = extract(net, samples, tf, several)
    extract(net, samples, tf, one)
    with torch.no_grad():
        seen = net.features(torch.stack([clean(load_for(clean, s.path)) for s in samples]))
    for name, store, views in (("several", several, 3), ("one", one, 1)):
        rows = torch.from_numpy(np.stack([store["pooled"].load(d) for d in digests]).astype(np.float32))
        assert rows.shape[1] == views
        first = torch.allclose(rows[:, 0], seen, rtol=2e-3, atol=2e-3)  # float16 storage
        assert first == (name == "several"), name
        for v in range(1, views):
            assert not torch.allclose(rows[:, v], seen, rtol=2e-2, atol=2e-2)


def test_cache_key_changes_with_every_field():
    """Completeness over the key's own fields: a field added later is covered without editing this test."""
    base = _key()
    for f in dataclasses.fields(CacheKey):
        value = getattr(base, f.name)
        if isinstance(value, tuple):
            other = tuple(v + 0.01 for v in value)
        elif isinstance(value, int):
            other = value + 1
        else:
            other = value + "x"
        assert dataclasses.replace(base, **{f.name: other}).digest() != base.digest(), f.name
    assert _key().digest() == _key().digest()


def test_the_run_keys_its_cache_with_every_option_that_changes_a_cached_tensor(small_data, tmp_path):
    """Each option that changes what the frozen part outputs moves the run's entries to another store."""
    from transferlab.data.datamodule import TransferData
    from transferlab.recipe.plan import Setup

    spec = get_spec("efficientnet_lite0")
    base = dict(data_dir=str(small_data), image_size=64)

    def data_for(cfg: TrainConfig, weights: str = "w") -> TransferData:
        setup = Setup(cfg, None, None, spec, cfg.image_size, None, None, fine_tune_at=6)
        return TransferData(setup, weights_digest=weights, cache_root=tmp_path)

    def store_dirs(_w="w", **change):
        cfg = TrainConfig(**{**base, **change})
        return {o: st.dir for o, st in data_for(cfg, _w).stores(cfg.augment, cfg.cache_views).items()}

    reference = store_dirs()
    for change in ({"image_size": 96}, {"resize": "squash"}, {"augment": "strong"}, {"cache_views": 3}):
        assert store_dirs(**change)["pooled"] != reference["pooled"], change
    assert store_dirs(_w="other")["pooled"] != reference["pooled"]
    data = data_for(TrainConfig(**base))
    assert data.stores("keras", 2, "bf16")["pooled"].dir != data.stores("keras", 2, "32")["pooled"].dir
    assert reference["prefix6"] != reference["pooled"]


def test_changed_image_misses_only_its_own_entry(net, small_data, tmp_path):
    import shutil

    from transferlab.data.index import Sample

    samples = index_folder(small_data).val[:3]
    copies = []
    for i, s in enumerate(samples):
        dest = tmp_path / f"{i}.jpg"
        shutil.copyfile(s.path, dest)
        copies.append(Sample(dest, s.label))
    stores = {"pooled": Store(tmp_path / "c", _key())}
    tf = eval_transform(net.spec, SIZE)
    assert extract(net, copies, tf, stores)[1] == 3
    assert extract(net, copies, tf, stores)[1] == 0
    from PIL import Image

    Image.open(copies[1].path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(copies[1].path)  # new content
    assert extract(net, copies, tf, stores)[1] == 1


def test_damaged_entries_are_found_recomputed_and_counted_in_one_warning(net, small_data, tmp_path):
    samples = index_folder(small_data).val[:4]
    tf = eval_transform(net.spec, SIZE)
    stores = {"pooled": Store(tmp_path, _key())}
    digests, _ = extract(net, samples, tf, stores)
    good = np.array(stores["pooled"].load(digests[0]))
    cut = stores["pooled"].path(digests[0])
    cut.write_bytes(cut.read_bytes()[:100])  # cut short, as a full disk or a killed copy leaves it
    stores["pooled"].path(digests[1]).write_bytes(b"something else entirely")  # overwritten
    np.save(stores["pooled"].path(digests[2]), np.zeros((3, 7), np.float32))  # another layout
    with pytest.warns(UserWarning, match=r"^3 feature-cache entries .* computed again") as caught:
        done = fill(net, samples, digests, stores, Pass(tf, workers=0))
    assert len(caught) == 1 and done.damaged == 3 and done.computed == 3
    assert np.array_equal(np.array(stores["pooled"].load(digests[0])), good)
    assert all(stores["pooled"].readable(d) for d in digests)


def test_large_cached_sets_stay_memory_mapped_and_give_the_same_rows(net, small_data, tmp_path, monkeypatch):
    from transferlab.data import datamodule
    from transferlab.data.datamodule import CachedDataset

    samples = index_folder(small_data).val[:3]
    stores = {"pooled": Store(tmp_path, _key())}
    digests, _ = extract(net, samples, eval_transform(net.spec, SIZE), stores)
    labels = [s.label for s in samples]
    in_memory = CachedDataset(stores["pooled"], digests, labels, random_view=False)
    monkeypatch.setattr(datamodule, "PRELOAD_BYTES", 0)
    mapped = CachedDataset(stores["pooled"], digests, labels, random_view=False)
    assert in_memory.preloaded is not None and mapped.preloaded is None
    for i in range(3):
        assert torch.equal(in_memory[i][0], mapped[i][0]) and in_memory[i][1] == mapped[i][1] == labels[i]


def test_extraction_falls_back_to_the_original_groups_when_folding_disagrees(net, small_data, tmp_path, monkeypatch):
    from transferlab.data import cache

    def broken(module):  # a folding that changes the outputs
        copy = fold_batchnorm(module)
        with torch.no_grad():
            for p in copy.parameters():
                p.mul_(1.5)
        return copy

    samples = index_folder(small_data).val[:2]
    tf = eval_transform(net.spec, SIZE)
    good = {"pooled": Store(tmp_path / "good", _key())}
    digests, _ = extract(net, samples, tf, good)
    monkeypatch.setattr(cache, "fold_batchnorm", broken)
    fallback = {"pooled": Store(tmp_path / "fallback", _key())}
    extract(net, samples, tf, fallback)
    for d in digests:
        assert np.allclose(np.array(good["pooled"].load(d)), np.array(fallback["pooled"].load(d)), atol=2e-3)


@pytest.mark.slow
def test_second_run_hits_the_shared_cache(small_data, tmp_path):
    cfg = dict(data_dir=str(small_data), cache_dir=str(tmp_path / "cache"), **FAST)
    first = train(TrainConfig(out=str(tmp_path / "a"), **cfg))
    second = train(TrainConfig(out=str(tmp_path / "b"), **cfg))
    assert first["timings"]["extracted_images"] == 48 + 32
    assert second["timings"]["extracted_images"] == 0
    assert second["best_val_accuracy"] == first["best_val_accuracy"]


@pytest.mark.slow
def test_validation_features_are_float32_whatever_the_training_views_are_computed_in(small_data, tmp_path):
    """The accuracies that choose the best epoch are those the saved model gives when it predicts."""
    import json

    cfg = {**FAST, "extract_precision": "bf16", "fine_tune_epochs": 0}
    metrics = train(
        TrainConfig(data_dir=str(small_data), out=str(tmp_path / "r"), cache_dir=str(tmp_path / "c"), **cfg)
    )
    keys = sorted(
        (k["augment"], k["precision"])
        for k in map(json.loads, map(Path.read_text, (tmp_path / "c").glob("*/key.json")))
    )
    assert keys == [("keras", "bf16"), ("none", "32")]  # training views as asked; validation images in float32
    assert metrics["eval_accuracy"] == pytest.approx(metrics["best_val_accuracy"], abs=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100", "inception_v3"])
def test_batchnorm_folding_keeps_the_outputs_and_removes_the_batchnorms(arch):
    """Folded copies compute the same features (with non-trivial BatchNorm statistics) without BatchNorm passes."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 96, 96)
    folded = fold_batchnorm(model)
    with torch.inference_mode():
        a, b = model(x), folded(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched


class _Slow(torch.nn.Module):
    """Appended to a layer group: each pass in ``precision`` ("32" or "bf16" autocast) calls ``later``, which
    moves the clock the precision choice times with, so a test decides which precision is faster on any machine."""

    def __init__(self, precision: str, later: Callable[[], None]) -> None:
        super().__init__()
        self.precision, self.later = precision, later  # a function: the folded copy calls this very one

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(z.device.type) == (self.precision == "bf16"):
            self.later()
        return z


def test_bf16_extraction_agrees_with_float32_and_is_refused_when_it_would_not(net, small_data, tmp_path, monkeypatch):
    """Each branch forced (bf16 faster or slower, its cosine enough or not), then this machine's own choice."""
    import copy
    import time

    from transferlab.data import cache

    samples = index_folder(small_data).val[:8]
    tf = eval_transform(net.spec, SIZE)
    digests = [file_digest(s.path) for s in samples]
    exact = {"pooled": Store(tmp_path / "32", _key())}
    assert fill(net, samples, digests, exact, Pass(tf, workers=0)).precision == "32"  # float32 asked: never bf16
    clock, perf_counter = [0.0], time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + clock[0])

    def ten_seconds_later() -> None:
        clock[0] += 10.0

    def filled(slow: str, where: str) -> tuple[str, list[float]]:
        """Fill a bf16-keyed store with ``slow`` made the slower precision: the precision used, each image's cosine."""
        paced = copy.deepcopy(net)
        paced.groups[0].append(_Slow(slow, ten_seconds_later))
        stores = {"pooled": Store(tmp_path / where, _key(precision="bf16"))}
        used = fill(paced, samples, digests, stores, Pass(tf, workers=0)).precision
        a, b = (torch.from_numpy(np.stack([st["pooled"].load(d) for d in digests]).astype(np.float32)[:, 0])
                for st in (exact, stores))  # fmt: skip
        return used, torch.nn.functional.cosine_similarity(a, b).tolist()

    # bf16 faster and pointing the same way as float32: taken, and its features are bf16's, not float32's
    used, cosines = filled("32", "bf16")
    assert used == "bf16" and min(cosines) >= cache.BF16_MIN_COSINE and max(cosines) < 1 - 1e-7
    # bf16 slower: float32, the very same numbers as the float32 store
    assert filled("bf16", "bf16_slower") == ("32", [pytest.approx(1, abs=1e-6)] * len(digests))
    assert all(np.array_equal(np.array(Store(tmp_path / "bf16_slower", _key(precision="bf16")).load(d)),
                              np.array(exact["pooled"].load(d))) for d in digests)  # fmt: skip
    # bf16 faster but below the cosine asked for: refused
    monkeypatch.setattr(cache, "BF16_MIN_COSINE", 1.01)
    assert filled("32", "refused")[0] == "32"
    for d in digests:
        assert np.array_equal(np.array(Store(tmp_path / "refused", _key(precision="bf16")).load(d)),
                              np.array(exact["pooled"].load(d)))  # fmt: skip
    monkeypatch.undo()
    # this machine's own clock: bf16 exactly when its measured seconds were lower (its agreement shown above)
    decisions = cache.Decisions()
    own = {"pooled": Store(tmp_path / "own", _key(precision="bf16"))}
    done = fill(net, samples, digests, own, Pass(tf, workers=0, decisions=decisions))
    ((used, seconds),) = [(d.precision, d.seconds) for d in decisions.made.values()]
    assert done.precision == used == ("bf16" if seconds["bf16"] < seconds["32"] else "32")


def test_the_precision_is_chosen_once_for_the_fills_of_one_network(net, small_data, tmp_path, monkeypatch):
    """The training images' first batch decides; the validation fill reuses it instead of timing again."""
    from transferlab.data import cache

    calls = []
    choose = cache._choose
    monkeypatch.setattr(cache, "_choose", lambda *a: calls.append(a[-1]) or choose(*a))
    index, tf, decisions = index_folder(small_data), eval_transform(net.spec, SIZE), cache.Decisions()
    for split, where in ((index.train[:4], "train"), (index.val[:4], "val")):
        stores = {"pooled": Store(tmp_path / where, _key(precision="bf16"))}
        done = fill(net, split, [file_digest(s.path) for s in split], stores, Pass(tf, workers=0, decisions=decisions))
        assert done.computed == 4
    assert calls == ["bf16"] and len(decisions.made) == 1
    again = {"pooled": Store(tmp_path / "again", _key(precision="bf16"))}
    fill(net, index.val[4:6], [file_digest(s.path) for s in index.val[4:6]], again, Pass(tf, workers=0))
    assert calls == ["bf16", "bf16"]  # without ``decisions``, each fill decides for itself


def test_a_budgets_speed_measurement_makes_the_choice_that_the_fills_reuse(net, small_data, tmp_path, monkeypatch):
    """--time-budget plans from the frozen pass as extraction will run it, timed while choosing how, once."""
    from transferlab.data import cache

    calls = []
    choose = cache._choose
    monkeypatch.setattr(cache, "_choose", lambda *a: calls.append(a[-1]) or choose(*a))
    index, tf, decisions = index_folder(small_data), eval_transform(net.spec, SIZE), cache.Decisions()
    x = torch.stack([tf(load_for(tf, s.path)) for s in index.train[:8]])
    net.train()
    speed = cache.frozen_speed(net, x, "bf16", decisions=decisions)
    assert net.training  # left as it was found
    ((used, seconds),) = [(d.precision, d.seconds) for d in decisions.made.values()]
    assert speed == {"chosen": 1 / seconds[used], "32": 1 / seconds["32"]} and speed["chosen"] >= speed["32"] > 0
    assert used == "32" or seconds["bf16"] < seconds["32"]  # bf16 only when faster
    stores = {"pooled": Store(tmp_path / "train", _key(precision="bf16"))}
    digests = [file_digest(s.path) for s in index.train[:4]]
    done = fill(net.eval(), index.train[:4], digests, stores, Pass(tf, workers=0, decisions=decisions))
    assert done.computed == 4 and done.precision == used and calls == ["bf16"]


def test_preloading_many_entries_holds_no_file_open(tmp_path):
    """A large store read into memory: one open file per entry would pass the process's limit (50,000 did)."""
    import resource

    from transferlab.data.datamodule import CachedDataset

    store = Store(tmp_path, _key(views=2))
    digests = [f"{i:040x}" for i in range(400)]
    for i, d in enumerate(digests):
        store.save(d, np.full((2, 8), i, dtype=np.float32))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # fewer than the entries
    try:
        data = CachedDataset(store, digests, [0] * len(digests), random_view=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert data.preloaded is not None and data.preloaded.shape == (400, 2, 8)
    assert float(data[399][0][0]) == 399
