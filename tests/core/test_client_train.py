"""A site's client-train adopts the server's contract before it trains, and refuses what cannot fit."""
from __future__ import annotations

import pytest

from collafuse.client_train import ClientTrainConfig, ClientTrainer
from collafuse.config import DataConfig, TrainConfig, client_preset
from collafuse.errors import ConfigError


def _info(shape, classes=10, labels=True):
    async def transport(method, path, headers, body):
        assert (method, path) == ("GET", "/v1/info")
        return 200, {"schedule": _schedule_doc(), "image_shape": list(shape), "num_classes": classes,
                     "server_conditioning": "label" if labels else "none",
                     "you": {"client_levels": 60, "handoff_level": 59, "cut_ratio": 0.6}}
    return transport


def _schedule_doc():
    from collafuse.config import ScheduleConfig

    return ScheduleConfig(100, "linear").build().to_dict()


def _cc(tmp_path, **kw):
    return ClientTrainConfig(out=str(tmp_path / "site"), server="http://127.0.0.1:9", token="t",
                             data=DataConfig("digits", 16, 3, "iid", 0.2, 0), model=client_preset(),
                             train=TrainConfig(steps=1, batch_size=4, device="cpu"), **kw)


def test_the_site_takes_the_servers_image_size(tmp_path, capsys):
    tr = ClientTrainer(_cc(tmp_path), transport=_info((1, 8, 8)))
    try:
        assert tuple(tr.x.shape[1:]) == (1, 8, 8) and tr.ms.model.config.sample_size == 8
        assert "resizing the site's data to 8×8" in capsys.readouterr().out
    finally:
        tr.close()


@pytest.mark.parametrize("shape, classes, words", [((3, 16, 16), 10, "channel"), ((1, 16, 16), 4, "classes")])
def test_what_cannot_fit_is_refused_before_training(tmp_path, shape, classes, words):
    with pytest.raises(ConfigError, match=words):
        ClientTrainer(_cc(tmp_path), transport=_info(shape, classes))
    assert not (tmp_path / "site").exists()  # nothing written


@pytest.mark.parametrize("url", ["localhost:8080", "127.0.0.1", "ftp://host/", ""])
def test_a_server_url_without_a_scheme_is_a_clear_error(tmp_path, url):
    with pytest.raises(ConfigError, match="--server must be a URL"):
        ClientTrainConfig(out=str(tmp_path), server=url, token="t")
