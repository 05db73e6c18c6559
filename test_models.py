"""Tests of models.py's refusals: each bad --model or --device stops at once with a sentence naming the fix."""
import time

import pytest

import models


@pytest.mark.parametrize("name, says", [
    ("tiny-lama", "did you mean tiny-llama"),
    ("./no-such-folder", "no such folder"),
    ("smollm2-135", "did you mean smollm2-135m"),
])
def test_bad_model_names_fail_fast_with_the_fix(name, says):
    start = time.time()
    with pytest.raises(SystemExit, match=says):
        models.load_model(name)
    assert time.time() - start < 5  # no hub retries before the message


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        models.load_model(str(tmp_path))


def test_an_unreachable_hub_id_is_refused_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="cannot be reached"):
        models.load_model("someone/not-cached-model")


@pytest.mark.parametrize("device, says", [("gpu0", "not a device name"), ("cuda:7", "CUDA")])
def test_bad_devices_are_refused(device, says):
    if device.startswith("cuda") and models.torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(SystemExit, match=says):
        models.load_model("tiny-llama", device=device)
