import json
import socket
import time

import pytest
import torch
from conftest import SANITY, run_cli

from transferlab.data.transforms import imagenet_transform, load_for
from transferlab.errors import UserError
from transferlab.inference.predictor import from_backbone, predict
from transferlab.model.weights import create_backbone, find_weights, read_state_dict
from transferlab.model.zoo import get_spec


def expected():
    rows = [line.split("\t") for line in (SANITY / "EXPECTED.tsv").read_text().splitlines() if not line.startswith("#")]
    return {r[0]: (r[1], {int(i) for i in r[2].split(",")}) for r in rows}


def sanity_hits(model, transform) -> int:
    """How many sanity photos get an accepted class (top-1 or top-5, as EXPECTED.tsv says)."""
    hits = 0
    with torch.inference_mode():
        for name, (rule, accepted) in expected().items():
            logits = model(transform(load_for(transform, SANITY / name)).unsqueeze(0))[0]  # as runs decode
            top = logits.topk(1 if rule == "top1" else 5).indices.tolist()
            hits += bool(accepted & set(top))
    return hits


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_bundled_lite_weights_predict_the_expected_imagenet_classes(name):
    spec = get_spec(name)
    model, found = create_backbone(spec, num_classes=1000)
    assert found.origin == "package"
    assert sanity_hits(model.eval(), imagenet_transform(spec)) == len(expected())


def test_sanity_check_catches_unnormalized_pixels_and_wrong_padding():
    """The check above is discriminating: raw 0-255 pixels, or TF 'same' padding lost, fail it."""
    import timm

    spec = get_spec("efficientnet_lite0")
    model, found = create_backbone(spec, num_classes=1000)
    transform = imagenet_transform(spec)
    raw = lambda im: transform(im) * 127.5 + 127.5  # noqa: E731 - undo Normalize(0.5, 0.5) and scaling
    assert sanity_hits(model.eval(), raw) == 0
    symmetric = timm.create_model("efficientnet_lite0", num_classes=1000)  # same layers, PyTorch padding
    symmetric.load_state_dict(dict(zip(symmetric.state_dict(), read_state_dict(found.path).values())))
    assert sanity_hits(symmetric.eval(), transform) < len(expected())


def test_imagenet_head_predictions_share_the_one_result_schema():
    out = predict(from_backbone("efficientnet_lite0"), [SANITY / "hot_dog.jpg"], k=5)
    assert out[0]["image"].endswith("hot_dog.jpg")
    top = out[0]["top"]
    assert len(top) == 5 and top[0]["index"] == 934 and top[0]["label"] == "hotdog, hot dog, red hot"
    assert top[0]["prob"] > 0.5 and all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:]))


def test_hub_only_backbone_offline_fails_fast_with_one_line(empty_hf):
    """The hub 'answers' on a socket that accepts and never replies: we must not hang on it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        env = {**empty_hf, "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}"}
        start = time.monotonic()
        proc = run_cli("predict", SANITY / "cat.png", "--backbone", "resnet50", env=env, timeout=60)
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert proc.returncode == 2
    assert elapsed < 10
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no pretrained weights for backbone 'resnet50'" in lines[0]
    assert "Hugging Face cache" in lines[0] and "(unreachable)" in lines[0] and "--weights FILE" in lines[0]
    assert "Traceback" not in proc.stderr


def test_offline_flag_skips_the_hub(empty_hf, monkeypatch):
    for k, v in {**empty_hf, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        find_weights(get_spec("mobilenet_v2"))


def test_explicit_safetensors_file_is_used(tmp_path):
    from safetensors.torch import save_file

    spec = get_spec("efficientnet_lite0")
    model, _ = create_backbone(spec, num_classes=0)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, found = create_backbone(spec, weights=path, num_classes=0)
    assert found.origin == "file"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="do not fit tf_efficientnet_lite0"):
        create_backbone(get_spec("efficientnet_lite0"), weights=path)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_marker",))


def test_pickled_code_in_a_weights_file_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"w": _Evil()}, path)
    with pytest.raises(UserError, match="cannot read weights file"):
        read_state_dict(path)
    assert not (tmp_path / "pwned_marker").exists()


def test_models_command_marks_bundled_available_and_hub_ones_not(empty_hf):
    proc = run_cli("models", "--format", "json", env=empty_hf)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {n for n, r in rows.items() if r["available"]} == {
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    }
    assert rows["resnet50"]["params_m"] == pytest.approx(23.5, abs=0.1)
    assert rows["efficientnet_lite0"]["input_size"] == 224


def test_cli_predict_json_on_bundled_backbone():
    proc = run_cli("predict", SANITY / "parrot.jpg", SANITY / "bird.png", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [o["top"][0]["index"] for o in out] == [88, 19]


CORAL = SANITY.parents[1] / "weights" / "coral" / "mobilenet_v2_1.0_224_quant.tflite"


def test_tflite_mobilenet_v2_passes_the_imagenet_sanity_check_and_only_with_tensorflow_padding():
    """Google's uint8 MobileNetV2, dequantized onto timm's mobilenetv2_100: every sanity photo right, its own
    preprocessing ((x - 128) / 128, centre crop); with PyTorch's symmetric padding the same weights fail."""
    import timm

    from transferlab.model.tflite import read_tflite, spec_for, tflite_state_dict

    spec = spec_for(get_spec("mobilenet_v2"), CORAL)
    assert spec.pad_type == "same" and spec.mean == (128 / 255,) * 3 and spec.std == pytest.approx((128 / 255,) * 3)
    model, found = create_backbone(spec, CORAL, num_classes=1000)
    assert found.origin == "file"
    assert sanity_hits(model.eval(), imagenet_transform(spec)) == len(expected())
    out = predict(from_backbone("mobilenet_v2", CORAL), [SANITY / "hot_dog.jpg", SANITY / "parrot.jpg"], k=1)
    assert [r["top"][0]["index"] for r in out] == [934, 88]  # the background class dropped: 1,000 ImageNet classes
    symmetric = timm.create_model("mobilenetv2_100", num_classes=1000)
    symmetric.load_state_dict(tflite_state_dict(symmetric, read_tflite(CORAL), "mobilenetv2_100", str(CORAL)))
    assert sanity_hits(symmetric.eval(), imagenet_transform(spec)) < len(expected())


def test_a_tflite_file_of_another_architecture_or_no_tflite_at_all_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"has 53 convolutions \(17 depthwise\) where tf_efficientnet_lite0 has 49"):
        create_backbone(get_spec("efficientnet_lite0"), CORAL)
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(CORAL.read_bytes()[:4096])
    with pytest.raises(UserError, match="cannot read .*broken.tflite as a TFLite model"):
        create_backbone(get_spec("mobilenet_v2"), broken)


@pytest.mark.slow
def test_train_and_export_with_tflite_weights_offline(tmp_path, empty_hf):
    from conftest import make_subset

    data = make_subset(tmp_path / "data", train=12, val=8)
    out = tmp_path / "run"
    args = ["--backbone", "mobilenet_v2", "--weights", CORAL, "--image-size", "96", "--epochs", "1",
            "--fine-tune-epochs", "1", "--workers", "0", "--batch-size", "8"]  # fmt: skip
    trained = run_cli("train", data, "--out", out, *args, env={**empty_hf, "HF_HUB_OFFLINE": "1"})
    assert trained.returncode == 0, trained.stderr
    config = (out / "config.yaml").read_text()
    assert "pad_type: same" in config and "weights_origin: file" in config
    exported = run_cli("export", out)  # rebuilt from config.yaml alone, TensorFlow padding included; parity 1e-4
    assert exported.returncode == 0, exported.stderr
