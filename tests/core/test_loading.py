"""Loading: safe defaults and clear errors for every way loading can go wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, XLMRobertaModel

from crossrank import Reranker
from crossrank.loading import ModelLoadError
from crossrank.testing import TINY_CONFIG


def test_unknown_local_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        Reranker(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        Reranker("./models/not-here")


def test_hub_id_without_network_says_how_to_use_a_local_path() -> None:
    # local_files_only fails exactly like a machine without network, without the retries
    with pytest.raises(ModelLoadError) as info:
        Reranker("BAAI/bge-reranker-v2-m3-not-cached", local_files_only=True)
    message = str(info.value)
    assert "local_files_only=True turns downloads off" in message
    assert "pass a local directory instead" in message


def test_checkpoint_that_is_not_a_sequence_classifier(skeleton_dir: Path, tmp_path: Path) -> None:
    config = AutoConfig.from_pretrained(skeleton_dir, **TINY_CONFIG)
    config.architectures = ["XLMRobertaModel"]
    XLMRobertaModel(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (skeleton_dir / name).exists():
            shutil.copy(skeleton_dir / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="not a sequence-classification model"):
        Reranker(str(tmp_path))
    # the same weights with a classifier architecture declared still lack the head's weights
    config.architectures = ["XLMRobertaForSequenceClassification"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"lack.*classifier"):
        Reranker(str(tmp_path))


def test_only_safetensors_are_loaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, target)
    weights = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    torch.save(weights, target / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        Reranker(str(target))


def test_remote_code_is_off_by_default(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import crossrank.loading as loading

    seen: list[object] = []
    real = loading.AutoModelForSequenceClassification.from_pretrained

    def spy(*args: object, **kwargs: object):
        seen.append(kwargs.get("trust_remote_code"))
        seen.append(kwargs.get("use_safetensors"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForSequenceClassification, "from_pretrained", spy)
    Reranker(str(tiny_model_dir))
    assert seen == [False, True]
