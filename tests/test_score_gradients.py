import json

import numpy as np
import pytest
from conftest import import_tool

from pbexport import masking
from pbexport.backbones import load_backbone
from pbexport.taskmodel import build_task_model


def test_score_gradients_measure_every_mask_score_and_the_share_above_each_eps(tmp_path, tiny_npz, monkeypatch):
    tool = import_tool("score_gradients")
    monkeypatch.setattr(tool, "WEIGHTS", {})  # a seeded random init: the real weights are optional
    rms = tool.score_gradient_rms("cifar_resnet20", str(tiny_npz), batches_seen=2)
    model = build_task_model(load_backbone("cifar_resnet20", None), 3, "piggyback", True, 0)
    assert rms.shape == (sum(s.numel() for s in masking.mask_scores(model.net).values()),)  # the head has none
    assert (rms >= 0).all() and (rms > 0).mean() > 0.5  # dead channels get none, most scores some
    out = tmp_path / "gradients.json"
    assert tool.main(["--backbones", "cifar_resnet20", "--datasets", str(tiny_npz), "--batches", "2",
                      "--eps", "0", "1e-5", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["dataset"] == "tiny"
    shares = result["share_above"]
    assert shares["0.0"] == (rms > 0).mean() and shares["1.0"] == 0.0  # no score gradient is that strong
    assert result["quantiles"] == sorted(result["quantiles"]) and np.isclose(result["quantiles"][1], np.median(rms))


def test_score_gradients_refuse_no_batches(capsys):
    tool = import_tool("score_gradients")
    with pytest.raises(SystemExit) as exc:
        tool.main(["--batches", "0"])
    assert exc.value.code == 2 and "--batches must be at least 1, got 0" in capsys.readouterr().err
