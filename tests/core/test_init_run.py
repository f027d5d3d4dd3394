"""`collafuse init`: a run with untrained weights for networked training, no data on the server."""
import json

from collafuse.checkpoint import load_run, read_state
from collafuse.cli import main

TINY = ["--clients", "2", "--cut-ratio", "0.6", "--client-model", "tiny", "--server-model", "tiny"]


def test_init_writes_a_loadable_step_zero_run_without_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["init", "--out", str(out), *TINY, "--num-classes", "7", "--channels", "3"]) == 0
    assert "collafuse serve --run" in capsys.readouterr().out  # says what comes next
    info = json.loads((out / "data.json").read_text())
    assert (info["num_classes"], info["channels"], info["image_size"]) == (7, 3, 16)
    run = load_run(str(out))
    assert run.step == 0 and run.model_version.startswith("run@0:")
    assert run.server.config.in_channels == 3 and len(run.clients) == 2
    assert read_state(str(out / "checkpoints" / "step_0000000"))["step"] == 0


def test_init_reads_the_shape_from_data_and_is_seeded(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert main(["init", "--out", str(d), *TINY, "--seed", "3"]) == 0
    sa = read_state(str(a / "checkpoints" / "step_0000000"))["files"]
    sb = read_state(str(b / "checkpoints" / "step_0000000"))["files"]
    assert sa["server.safetensors"] == sb["server.safetensors"]  # same seed, same weights
    assert json.loads((a / "data.json").read_text())["num_classes"] == 10  # the digits


def test_init_refuses_bad_input_and_an_existing_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["init", "--out", str(out), *TINY, "--num-classes", "7"]) == 2
    assert "--num-classes and --channels go together" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    assert main(["init", "--out", str(out), *TINY, "--num-classes", "0", "--channels", "1"]) == 2
    assert main(["init", "--out", str(out), *TINY]) == 0
    assert main(["init", "--out", str(out), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
