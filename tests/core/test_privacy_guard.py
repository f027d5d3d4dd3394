"""The product's privacy guard rails: ``collafuse train`` and ``collafuse client-train`` print the
verdict of the site's own privacy report for the cut before training, refuse (exit 2, one line) a
cut the report marks unsafe or does not cover unless ``--accept-disclosure`` is given, and point to
``collafuse privacy`` without a report."""
from __future__ import annotations

import json
import os

import pytest

from collafuse.cli import main
from collafuse.privacy import PrivacyConfig, guard_verdict, privacy_report

# the report's planned run: 4 steps × 8 disclosures, each image disclosed once (T = 1000, linear)
PLAN = dict(steps=4, batch_size=8, disclose="once")


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> str:
    """A real report of the privacy module on 80 digits (≈ 2 s): on this grid c = 0.2 fails the
    default target, c = 0.8 and 0.9 meet it."""
    rep = privacy_report(PrivacyConfig(max_images=80, cut_ratios=(0.2, 0.6, 0.8, 0.9), draws=1, link_cuts=(),
                                       **PLAN), progress=False)
    assert rep["recommended_cut"]["planned_run"] == 0.8, rep["recommended_cut"]
    d = tmp_path_factory.mktemp("privacy")
    path = d / "privacy.json"
    path.write_text(json.dumps(rep))
    return str(path)


def _report(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_verdict_lines(report_path):
    rep = _report(report_path)
    kw = dict(timesteps=1000, beta_schedule="linear", **PLAN)
    ok, line = guard_verdict(rep, 0.2, **kw)
    assert not ok and "UNSAFE" in line and "recommends c ≥ 0.8" in line and "\n" not in line
    ok, line = guard_verdict(rep, 0.85, **kw)  # between rows: judged by the row below (0.8)
    assert ok and "meets the target" in line and "row c = 0.8" in line
    assert guard_verdict(rep, 1.0, **kw)[0]  # c = 1 sends nothing
    # what the report cannot speak for is not covered
    for cut, changes in [(0.1, {}), (0.8, {"timesteps": 500}), (0.8, {"beta_schedule": "cosine"}),
                         (0.8, {"disclose": "fresh"})]:
        ok, line = guard_verdict(rep, cut, **(kw | changes))
        assert not ok and "NOT COVERED" in line and "\n" not in line, (cut, changes, line)
    # disclose once is covered however many steps (each image is sent once)
    assert guard_verdict(rep, 0.8, **(kw | {"steps": 4000}))[0]


def _train(tmp_path, cut, *extra):
    return main(["train", "--out", str(tmp_path / "run"), "--data", "digits", "--clients", "1", "--cut-ratio", str(cut),
                 "--client-model", "tiny", "--server-model", "tiny", "--steps", "1", "--batch-size", "8",
                 "--device", "cpu", "--checkpoint-every", "1", *extra])


def test_train_refuses_an_unsafe_cut(tmp_path, report_path, capsys):
    rc = _train(tmp_path, 0.2, "--disclose", "once", "--privacy-report", report_path)
    out, err = capsys.readouterr()
    assert rc == 2
    assert "UNSAFE" in out and "cut 0.2" in out
    assert len(err.strip().splitlines()) == 1 and "--accept-disclosure" in err and "refusing" in err
    assert not os.path.exists(tmp_path / "run" / "config.json")  # nothing trained, nothing written
    # fresh noise over a run the report planned with disclose once is not covered: refused too
    assert _train(tmp_path, 0.8, "--privacy-report", report_path) == 2
    assert "NOT COVERED" in capsys.readouterr().out


def test_train_accepts_with_the_flag_and_a_safe_cut(tmp_path, report_path, capsys):
    assert _train(tmp_path, 0.2, "--disclose", "once", "--privacy-report", os.path.dirname(report_path),
                  "--accept-disclosure") == 0
    out = capsys.readouterr().out
    assert "UNSAFE" in out and "--accept-disclosure" in out and "trained to step 1" in out
    assert _train(tmp_path / "b", 0.8, "--disclose", "once", "--privacy-report", report_path) == 0
    out = capsys.readouterr().out
    assert "meets the target" in out and "trained to step 1" in out


def test_train_without_a_report_points_to_privacy(tmp_path, capsys):
    assert _train(tmp_path, 0.6) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("privacy:")]
    assert len(lines) == 1 and "collafuse privacy --data digits --cut-ratios 0.6" in lines[0]
    assert "--privacy-report" in lines[0]


def test_a_bad_report_is_one_line(tmp_path, capsys):
    bad = tmp_path / "privacy.json"
    bad.write_text('{"rows": []}')
    for path in (str(bad), str(tmp_path / "missing.json")):
        assert _train(tmp_path, 0.6, "--privacy-report", path) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "collafuse privacy" in err


class FakeServer:
    """Answers client-train's GET /v1/info (T = 1000, linear) and records uploads."""

    def __init__(self, cut: float, min_level=None):
        from collafuse.config import ScheduleConfig

        k = round(cut * 1000)
        self.info = {"schedule": ScheduleConfig(1000, "linear").build().to_dict(), "image_shape": [1, 16, 16],
                     "num_classes": 10, "server_conditioning": "label", "labels_required": True,
                     "you": {"client_levels": k, "handoff_level": k - 1, "cut_ratio": cut,
                             "min_handoff_level": min_level}}
        self.uploads = 0

    def transport(self, *a, **kw):
        async def call(method, path, headers, body):
            if (method, path) == ("GET", "/v1/info"):
                return 200, self.info
            assert (method, path) == ("POST", "/v1/train")
            self.uploads += 1
            return 200, {"accepted": True}
        return call


def _client_train(tmp_path, monkeypatch, server, *extra):
    monkeypatch.setattr("collafuse.client_train.aiohttp_transport", server.transport)
    return main(["client-train", "--server", "http://127.0.0.1:9", "--token", "t", "--out", str(tmp_path / "site"),
                 "--client-model", "tiny", "--steps", "1", "--batch-size", "4", "--upload-batch", "8",
                 "--device", "cpu", "--disclose", "once", *extra])


def test_client_train_refuses_the_servers_unsafe_cut(tmp_path, monkeypatch, report_path, capsys):
    server = FakeServer(0.2)
    assert _client_train(tmp_path, monkeypatch, server, "--privacy-report", report_path) == 2
    out, err = capsys.readouterr()
    assert "UNSAFE" in out and len(err.strip().splitlines()) == 1 and "--accept-disclosure" in err
    assert server.uploads == 0
    assert _client_train(tmp_path, monkeypatch, server, "--privacy-report", report_path, "--accept-disclosure") == 0
    out = capsys.readouterr().out
    assert server.uploads == 1 and "each row's class label" in out  # the summary says labels were sent


def test_client_train_at_a_safe_cut_and_without_a_report(tmp_path, monkeypatch, report_path, capsys):
    server = FakeServer(0.8)
    assert _client_train(tmp_path, monkeypatch, server, "--privacy-report", report_path) == 0
    assert "meets the target" in capsys.readouterr().out and server.uploads == 1
    assert _client_train(tmp_path / "b", monkeypatch, FakeServer(0.8)) == 0
    assert "collafuse privacy --data digits --cut-ratios 0.8" in capsys.readouterr().out


def test_client_train_stops_before_a_server_minimum(tmp_path, monkeypatch, capsys):
    server = FakeServer(0.6, min_level=700)
    assert _client_train(tmp_path, monkeypatch, server) == 2
    err = capsys.readouterr().err
    assert "700" in err and "599" in err and server.uploads == 0
