from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from stn_deploy.cli import COMMANDS, cli


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stn_deploy", *args], capture_output=True,
                          text=True, timeout=300)


def test_every_registered_command_exists() -> None:
    ctx = click.Context(cli)
    missing = [name for name in COMMANDS if cli.get_command(ctx, name) is None]
    assert missing == []


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert lines, "expected an error line"
    return lines[-1]


def test_train_bad_inputs(tmp_path: Path) -> None:
    proc = run("train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "nope"),
               "--out-dir", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "data folder not found" in _one_error_line(proc)
    proc = run("train", "--dataset", "mnist-bogus")
    assert proc.returncode == 2 and "Invalid value" in proc.stderr
    proc = run("train", "--resume", "--out-dir", str(tmp_path / "empty"))
    assert proc.returncode == 1 and "no checkpoint" in _one_error_line(proc)
    proc = run("train", "--epochs", "0")
    assert proc.returncode == 2
    assert not (tmp_path / "o").exists()


def test_train_cli_on_digits(tmp_path: Path) -> None:
    from stn_deploy.checkpoint import load_checkpoint

    proc = run("train", "--epochs", "1", "--out-dir", str(tmp_path), "--quiet", "--no-stn")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "curves.png", "last.pt", "metrics.json", "transforms.png"]
    assert load_checkpoint(tmp_path / "last.pt").config.dropout == 0.05  # the seed's


def test_clean_fraction_on_undistorted_data_is_one_line(tmp_path: Path) -> None:
    proc = run("train", "--epochs", "1", "--out-dir", str(tmp_path / "o"), "--quiet",
               "--distort", "none", "--clean-fraction", "0.25")
    assert proc.returncode == 1
    assert "--clean-fraction needs --distort" in _one_error_line(proc)
    assert not (tmp_path / "o").exists()


def test_pose_loss_without_rts_augment_is_one_line(tmp_path: Path) -> None:
    proc = run("train", "--epochs", "1", "--out-dir", str(tmp_path / "o"), "--quiet",
               "--stn-pose-loss", "1")
    assert proc.returncode == 1
    assert "--stn-pose-loss needs --rts-augment" in _one_error_line(proc)
    assert not (tmp_path / "o").exists()


def test_warp_penalty_without_an_stn_is_one_line(tmp_path: Path) -> None:
    """Named for what was asked: the improved recipe's own pose loss is dropped, not blamed."""
    proc = run("train", "--epochs", "1", "--out-dir", str(tmp_path / "o"), "--quiet",
               "--no-stn",
               "--recipe", "improved", "--stn-warp-penalty", "0.1")
    assert proc.returncode == 1
    assert "--stn-warp-penalty needs an STN" in _one_error_line(proc)
    assert not (tmp_path / "o").exists()
    alone = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out-dir",
                                     str(tmp_path / "a"), "--quiet", "--distort", "none",
                                     "--stn-warp-from", "2"])
    assert alone.exit_code == 1 and "--stn-warp-from needs --stn-warp-penalty" in alone.output
    assert not (tmp_path / "a").exists()
    # Given by name beside --no-stn, it is refused by its own name too, not dropped silently.
    plain = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out-dir",
                                     str(tmp_path / "p"), "--quiet", "--no-stn", "--distort", "rts",
                                     "--stn-warp-from", "2"])
    assert plain.exit_code == 1 and "--stn-warp-from needs an STN" in plain.output
    assert not (tmp_path / "p").exists()
    for extra, said in ((["--no-stn"], "--stn-warp-per-class needs an STN"),
                        (["--stn-warp-penalty", "0"],
                         "--stn-warp-per-class needs --stn-warp-penalty")):
        per_class = CliRunner().invoke(cli, ["train", "--epochs", "1", "--quiet", "--distort",
                                             "rts", "--out-dir", str(tmp_path / "c"),
                                             "--stn-warp-per-class", *extra])
        assert per_class.exit_code == 1 and said in per_class.output, per_class.output
        assert not (tmp_path / "c").exists()


def test_rts_recipe_trains_on_undistorted_data(tmp_path: Path) -> None:
    """--recipe rts names optimizer settings; its distortion options are moot without --distort.

    Also --affine and the STN losses: they reach the training options saved in the checkpoint."""
    from stn_deploy.checkpoint import load_checkpoint

    result = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out-dir", str(tmp_path),
                                      "--quiet", "--distort", "none", "--recipe", "rts",
                                      "--affine", "10", "0.1",
                                      "--rts-augment", "0.5", "--stn-pose-loss", "0.5",
                                      "--stn-warp-penalty", "0.05", "--stn-warp-from", "1e3"])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "last.pt")
    args = ckpt.train_args
    assert (args["affine_deg"], args["affine_scale"], args["clean_fraction"],
            args["rts_augment"], args["stn_pose_loss"], args["stn_warp_penalty"],
            args["stn_warp_from_px"]) == (10.0, 0.1, 0.25, 0.5, 0.5, 0.05, 1e3)
    # No epoch has spread 1,000 px, so the penalty has not started; the spread is recorded.
    assert ckpt.history[-1]["stn_warp_penalty"] == 0.0
    assert 0 <= ckpt.history[-1]["train_theta_spread_px"] < 1e3
    result = CliRunner().invoke(cli, ["train", "--affine", "10", "1.5"])
    assert result.exit_code == 2 and "--affine" in result.output


def test_loc_act_and_stn_passes_travel_in_the_checkpoint(tmp_path: Path) -> None:
    from stn_deploy.checkpoint import load_checkpoint

    result = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out-dir", str(tmp_path),
                                      "--quiet", "--distort", "none", "--loc-act", "leaky",
                                      "--stn-passes", "2"])
    assert result.exit_code == 0, result.output
    assert "seed localization net, LeakyReLU, 2 passes" in result.output
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert (ckpt.config.loc_act, ckpt.config.stn_passes) == ("leaky", 2)
    model = ckpt.model()
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    assert model.stn is not None and model.stn.passes == 2
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "last.pt")])
    assert r.exit_code == 0 and "STN (seed localization net, leaky, 2 passes)" in r.output
    for bad in (["--stn-passes", "0"], ["--loc-act", "tanh"]):
        result = CliRunner().invoke(cli, ["train", *bad])
        assert result.exit_code == 2 and bad[0] in result.output


def test_recipe_dropout_and_stn_rate_travel_in_the_checkpoint(tmp_path: Path) -> None:
    from stn_deploy.checkpoint import load_checkpoint

    result = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out-dir", str(tmp_path),
                                      "--quiet",
                                      "--dropout", "0.2", "--stn-lr-scale", "0.3"])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt.config.dropout == 0.2 and ckpt.train_args["dropout"] == 0.2
    assert ckpt.train_args["stn_lr_scale"] == 0.3
    # The optimizer really ran the STN at that fraction of the rest's peak rate.
    groups = ckpt.optimizer["param_groups"]
    assert groups[1]["max_lr"] == pytest.approx(0.3 * groups[0]["max_lr"])


def test_improved_recipe_tells_the_stn_what_to_undo(tmp_path: Path) -> None:
    """What kept the CIFAR-10 STN alive is the improved recipe's: RTS on a quarter of each
    batch, the pose loss, the STN on its own AdamW; --no-stn keeps the rest of it."""
    from stn_deploy.checkpoint import load_checkpoint

    base = ["train", "--epochs", "1", "--quiet", "--distort", "none", "--recipe", "improved"]
    result = CliRunner().invoke(cli, [*base, "--out-dir", str(tmp_path / "stn")])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "stn" / "last.pt")
    args = ckpt.train_args
    assert (args["rts_augment"], args["stn_pose_loss"], args["dropout"]) == (0.25, 1.0, 0.0)
    assert ckpt.history[-1]["train_pose_loss"] > 0
    assert [g["max_lr"] for g in ckpt.optimizer["stn"]["param_groups"]] == [1e-3]
    assert "exp_avg" in ckpt.optimizer["stn"]["state"][0]  # AdamW's
    assert (tmp_path / "stn" / "transforms_rts.png").is_file()
    plain = CliRunner().invoke(cli, [*base, "--no-stn", "--out-dir", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    plain_args = load_checkpoint(tmp_path / "plain" / "last.pt").train_args
    assert (plain_args["rts_augment"], plain_args["stn_pose_loss"]) == (0.25, 0.0)
    # A fraction of SGD's rate means nothing for the recipe's AdamW STN: said, not ignored.
    scaled = CliRunner().invoke(cli, [*base, "--stn-lr-scale", "0.3",
                                      "--out-dir", str(tmp_path / "scaled")])
    assert scaled.exit_code == 1 and "needs --stn-lr" in scaled.output
    assert not (tmp_path / "scaled").exists()


def test_checkpoint_bad_files(tmp_path: Path, digits_checkpoint: Path) -> None:
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.errors import StnDeployError

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(digits_checkpoint.read_bytes()[:5000])
    for bad in (junk, truncated, tmp_path / "missing.pt"):
        with pytest.raises(StnDeployError):
            load_checkpoint(bad)


def test_triton_repo_options_by_their_names(digits_checkpoint: Path, tmp_path: Path) -> None:
    """--out-dir, --model-name, --max-batch-size, --preferred-batch-size and --instance-kind
    reach the repository; --kind trt (or its old spellings) is TensorRT's kind."""
    from stn_deploy.export.pipeline import ExportRequest, run_export

    digits_onnx = tmp_path / "digits.onnx"  # verified, as a repository needs
    run_export(ExportRequest(checkpoint=digits_checkpoint, verify_samples=64, out=digits_onnx),
               echo=lambda _: None)
    repo = tmp_path / "repo"
    result = CliRunner().invoke(cli, [
        "triton-repo", str(digits_onnx), "--out-dir", str(repo), "--model-name", "m",
        "--max-batch-size", "8", "--preferred-batch-size", "2", "--preferred-batch-size", "8",
        "--instance-kind", "gpu", "--trt-fp16"])
    assert result.exit_code == 0, result.output
    text = (repo / "m-onnxruntime" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in text and "preferred_batch_size: [ 2, 8 ]" in text
    assert "KIND_GPU" in text and 'value: "FP16"' in text
    for typed in ("trt", "tensorrt", "engine"):
        result = CliRunner().invoke(cli, ["triton-repo", str(digits_onnx), "--out-dir",
                                          str(tmp_path / "r2"), "--kind", typed])
        assert result.exit_code == 1 and "serves .plan files" in result.output, result.output
    assert not (tmp_path / "r2").exists()
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli, ["triton-repo", str(digits_onnx), "--out-dir",
                                      str(tmp_path / "file")])
    assert result.exit_code == 2 and "--out-dir" in result.output


def test_loadtest_json_to_standard_output(digits_onnx: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--json - leaves standard output to the one JSON document: the table and its notes go
    to stderr. (The run itself is replaced: this is about where the report goes.)"""
    import stn_deploy.serving.loadtest as lt
    from stn_deploy.harness import system_info

    asked: list[lt.LoadRequest] = []
    row = {"concurrency": 1, "answered": 10, "errors": 0, "rejected": 0, "lost": 0,
           "throughput_ips": 99.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0,
           "accuracy_pct": 90.0, "agreement_pct": 100.0, "client_cpu_pct": 50.0}

    def fake(req: lt.LoadRequest, echo: object = None) -> dict[str, object]:
        asked.append(req)
        return {"settings": {"model_name": "digits", "url": req.url, "batch": req.batch,
                             "duration_s": req.duration_s, "max_requests": req.max_requests},
                "reference": {"backend": "onnxruntime", "model": str(req.model), "n": 10,
                              "accuracy_pct": 90.0},
                "system": system_info(), "results": [row], "created": "now"}

    monkeypatch.setattr(lt, "run_loadtest", fake)
    result = CliRunner().invoke(cli, ["loadtest", "http://h:1", "--model", str(digits_onnx),
                                      "--samples", "all", "--backend", "tensorrt",
                                      "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"] == [row]
    assert "stn-deploy loadtest: digits at http://h:1" in result.stderr
    assert asked[0].samples is None and asked[0].backend == "trt"
    result = CliRunner().invoke(cli, ["loadtest", "http://h:1", "--model", str(digits_onnx),
                                      "--samples", "0"])
    assert result.exit_code == 2 and "--samples" in result.output


@pytest.mark.parametrize("args, said", [
    (["--rate", "fast"], "'fast' is not a list of numbers"),
    (["--rate", "50,0"], "give positive request rates"),
    (["--rate", ","], "give positive request rates"),
    (["--rate", "50", "--arrivals", "uniform"], "'uniform' is not one of 'constant', 'poisson'"),
    (["--protocol", "json,http2"], "'http2' is none of json, binary, grpc"),
])
def test_loadtest_open_loop_and_protocol_usage_errors(tmp_path: Path, args: list[str],
                                                      said: str) -> None:
    """Refused by name, exit 2, before any model is loaded or request sent (the model file
    here is not even ONNX, and nothing listens at the URL)."""
    model = tmp_path / "m.onnx"
    model.write_text("not a model")
    result = CliRunner().invoke(cli, ["loadtest", "http://127.0.0.1:9", "--model", str(model),
                                      *args])
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert ("--protocol" if "--protocol" in args else
            "--arrivals" if "uniform" in args else "--rate") in result.output


def _has_tritonserver() -> bool:
    from stn_deploy.errors import StnDeployError
    from stn_deploy.serving.serve import server_files

    try:
        server_files()
    except StnDeployError:
        return False
    return True


def _three_free_ports() -> int:
    """An HTTP port whose +1 (gRPC) and +2 (metrics) are free too, as serve takes them."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port > 65533:
            continue
        taken = False
        for p in (port, port + 1, port + 2):
            with socket.socket() as s:
                taken = taken or s.connect_ex(("127.0.0.1", p)) == 0
        if not taken:
            return port


@pytest.mark.skipif(not _has_tritonserver(), reason="the tritonserver binary is not installed "
                    "(the [serve] extra's nvidia-pytriton wheel)")
def test_loadtest_open_loop_against_a_real_server(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`loadtest --rate 50 --arrivals poisson --protocol json` for 1 s against `serve`: every
    scheduled request answered, one row carrying its protocol, rate, the batch Triton's
    metrics say it formed and the served/in-process ratio; then SIGTERM stops serve cleanly."""
    import os
    import signal

    from stn_deploy.export.pipeline import ExportRequest, run_export

    model = tmp_path / "tiny.onnx"  # verified, as serve and triton-repo take only such files
    run_export(ExportRequest(checkpoint=tiny_checkpoint, embed_preprocess=True,
                             verify_samples=32, out=model), echo=lambda _: None)
    port = _three_free_ports()
    server = subprocess.Popen([sys.executable, "-m", "stn_deploy", "serve", str(model),
                               "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert server.stdout is not None
        said = [server.stdout.readline()]
        while "tritonserver pid" not in said[-1]:
            said.append(server.stdout.readline())
            assert said[-1] or server.poll() is None, "serve did not start: " + "".join(said)
        proc = run("loadtest", f"http://127.0.0.1:{port}", "--model", str(model), "--rate",
                   "50", "--arrivals", "poisson", "--protocol", "json", "--duration", "1",
                   "--samples", "64", "--json", "-")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["settings"]["arrivals"] == "poisson" and report["settings"]["rates"] == [50]
        [row] = report["results"]
        assert (row["protocol"], row["rate"]) == ("json", 50)
        assert row["answered"] == row["requests"] == 50 and row["lost"] == 0
        assert row["agreement_pct"] == 100.0
        assert row["mean_batch"] >= 1.0
        assert 0 < row["served_ratio"] == pytest.approx(row["throughput_ips"]
                                                        / row["inprocess_ips"])
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
