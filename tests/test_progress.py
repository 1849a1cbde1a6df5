"""Progress bars (kit.core.progress): shown by every loop over data, all silenced by TQDM_DISABLE=1, the
Trainer's bar and its printed log dicts too."""

import pytest

import kit


def _work(tmp_path):
    model, tokenizer = kit.testing.tiny_model("llama")
    texts = kit.loaders.data.corpus("validation")[:4]
    kit.evaluate.validation_loss(model, tokenizer, texts, max_length=16, batch_size=2)
    kit.angular_distances(model, tokenizer, texts, batch_size=2, max_length=16)
    config = kit.HealConfig(rank=2, steps=2, batch_size=2, seq_len=16, log_every=1, quantize=None)
    kit.heal(model, tokenizer, texts, config, output_dir=tmp_path / "heal")


@pytest.mark.parametrize("silenced", [False, True])
def test_tqdm_disable_silences_every_bar_and_the_trainers_log_dicts(silenced, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TQDM_DISABLE", "1" if silenced else "")
    _work(tmp_path)
    printed = capsys.readouterr()
    shown = [marker for marker in ("validation loss", "similarity scan", "'loss'", "it/s]") if marker in printed.out + printed.err]
    assert shown == ([] if silenced else ["validation loss", "similarity scan", "'loss'", "it/s]"]), printed.out + printed.err
